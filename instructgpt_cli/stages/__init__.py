"""One module a stage, each with ``run(cfg, ...)`` reading top to bottom. Stages never import each other."""
