"""The second gold task's prompts (`examples/gold/explain/prompts_train.jsonl`, `prompts_valid.jsonl`,
`prompts_heldout.jsonl`): **explain something to a ten-year-old in a short paragraph**. 100 topics (nature, the
body, everyday technology, how society works), written for igpt and released under CC0, under 4 framings: 60 for
training, 20 for validation (the watch that picks PPO's point) and 20 held out (the final win rate), so no prompt
shares its topic with one of another set; each prompt's "group" is its topic. Rerun to regenerate the same files:

    python examples/gold/explain/make_prompts.py

Unlike the first task (one warm sentence, judged for tone), the answers here are a paragraph (two or three
sentences: run.py samples up to 64 new tokens for this task, so a long answer is cut), and the gold judge
(`readability_judge.py`) measures another property: how easy the text is to read (Flesch reading ease)."""
from __future__ import annotations

import json
import random
from pathlib import Path

topics = """why the sky is blue
how rainbows form
why we have seasons
how plants make food from sunlight
why the moon changes shape
what causes thunder
how bees make honey
why leaves change colour in autumn
how fish breathe underwater
what makes a volcano erupt
how our heart pumps blood
why we need to sleep
how vaccines protect us
what germs are
why we get hiccups
how our eyes see colours
how a fridge keeps food cold
how a phone sends a message
what electricity is
how a magnet works
why ice floats on water
how airplanes stay in the air
what a computer program is
how the internet works
what money is for
why we pay taxes
what a vote is
how a library works
what a recipe is
why we recycle
how clouds form
why the ocean is salty
how earthquakes happen
what a fossil is
how caterpillars turn into butterflies
why cats purr
how birds know where to fly in winter
what gravity is
why the sun is hot
what stars are
how a seed grows into a tree
why we should brush our teeth
what a muscle does
how we hear sounds
why we sweat when it is hot
what a map is for
how a bridge holds up cars
why boats float
what a battery does
how a camera takes a picture
what a calendar is
why days are longer in summer
how snow is made
what a desert is
why some animals sleep all winter
how a river reaches the sea
what an island is
why dinosaurs died out
how a bicycle works
what soap does to dirt
why bread rises
how milk becomes cheese
what a vitamin is
why we should drink water
how a thermometer works
what wind is
why the grass is wet in the morning
how a compass points north
what a planet is
how astronauts live in space
what a robot is
how a lock and key work
why we have rules at school
what a job is
how a post letter gets delivered
what a museum keeps
why people speak different languages
how a clock keeps time
what an echo is
why stars twinkle
how a spider spins a web
what a coral reef is
why some animals have stripes
how ants find their food
what a shadow is
how glass is made
why metal feels cold to touch
what an allergy is
how a cut on the skin heals
why we yawn
what a tide is
how paper is made
what a newspaper does
why we have time zones
how a solar panel makes power
what a tornado is
how a submarine goes under water
why owls can see at night
how a piano makes music
what a habitat is""".splitlines()
frames = ["Explain {t} to a ten-year-old in a short paragraph.",
          "A child asks you {t}. Answer in two or three simple sentences.",
          "In a few sentences a young reader can follow, explain {t}.",
          "Write a short paragraph for a children's science book about {t}."]
assert len(topics) == len(set(topics)) == 100
random.seed(0)
random.shuffle(topics)
held, valid, train = topics[:20], topics[20:40], topics[40:]


def rows(ts: list[str]) -> list[dict]:
    # "group": the topic, which a prompt's 4 framings share: train-rm holds out a topic's rankings together
    # (igpt sample and label carry it from the prompt), and run.py clusters the gold win rate's interval by it
    return [{"prompt": f.format(t=t), "group": t} for t in ts for f in frames]


HERE = Path(__file__).resolve().parent
for i, (name, ts) in enumerate((("prompts_train.jsonl", train), ("prompts_valid.jsonl", valid),
                                ("prompts_heldout.jsonl", held))):
    records = rows(ts)
    random.Random(i).shuffle(records)
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
print(f"{len(topics)} topics: {4 * len(train)} training prompts, {4 * len(valid)} validation prompts, "
      f"{4 * len(held)} held-out prompts")
