"""igpt: InstructGPT's three steps (SFT, reward model, PPO-ptx) as a command-line tool.

Importing this package imports no torch; the stages import it when they run.
"""
__version__ = "0.1.0"
