"""The gold experiment's prompts (`examples/gold/prompts_train.jsonl`, `prompts_valid.jsonl`,
`prompts_heldout.jsonl`): reply to a message in one sentence. 100 messages (good news, bad news, everyday trouble)
under 4 framings: 60 for training, 20 for validation (the frontier that picks PPO's checkpoint) and 20 held out (the
final win rate), so no prompt shares its message with one of another set; each prompt's "group" is its message.
Rerun to regenerate the same files:

    python examples/gold/make_prompts.py

Why short replies: the reward model reads the last token (the paper's), which after a complete one-sentence
reply (EOS) sums up the sentence; after a 32-token cut of a long answer it did not (README, Gold-judged
experiment), and PPO's scores of cut answers are read where the reward model never trained."""
from __future__ import annotations

import json
import random
from pathlib import Path

messages = """I just got the job offer I was hoping for!
My flight got cancelled and I'm stuck at the airport.
I failed my driving test for the second time.
We're adopting a puppy next week.
My laptop died the night before my deadline.
I finally finished my first marathon.
The restaurant lost our reservation.
My grandmother turns ninety on Sunday.
I can't decide whether to move to a new city.
Our team lost the final by one point.
I started learning the piano last month.
My landlord is raising the rent again.
I got accepted into the nursing program.
The package I ordered arrived broken.
I'm nervous about my presentation tomorrow.
My sister had a baby girl this morning.
I burned the cake I made for the party.
We just bought our first house.
My bike was stolen from outside the library.
I passed my final exam!
The meeting ran two hours over again.
My best friend is moving abroad.
I planted tomatoes and they're finally growing.
I spilled coffee all over my notes.
I got a promotion at work today.
My cat has been sick all week.
I'm thinking about going back to school.
The concert tickets sold out before I could buy any.
I fixed the leaking sink all by myself.
My car won't start this morning.
We're getting married in June!
I didn't get picked for the team.
I just read a book that changed how I think.
My internet has been down for three days.
I volunteered at the animal shelter today.
I lost my wallet on the bus.
I'm starting my own small bakery.
My code finally compiled after hours of debugging.
It rained all through our beach vacation.
I ran into an old friend from school today.
My phone screen cracked again.
I cooked dinner for my parents for the first time.
Our garden flooded after the storm.
I got my first paycheck!
I have to work this whole weekend.
My son took his first steps today.
The bus was late and I missed my interview.
I learned to swim at forty.
My favorite cafe is closing down.
I finished painting the living room.
I have a job interview on Monday.
My neighbor keeps playing loud music at night.
I won a small prize in the photo contest.
I sprained my ankle playing soccer.
We celebrated ten years together last night.
The printer jammed right before the meeting.
I got a scholarship for next year.
My tomatoes all got eaten by birds.
I'm visiting Japan for the first time next month.
My presentation went really badly today.
I just moved into a new apartment.
My dog learned a new trick.
I forgot my friend's birthday.
I'm running for the student council.
The train was so crowded I couldn't get on.
I baked bread from scratch for the first time.
My manager criticized my report in front of everyone.
I'm taking my kids camping this weekend.
I got a parking ticket this morning.
I reached my savings goal for the year.
My brother and I had a big argument.
I'm learning to speak Spanish.
Our flight home is delayed six hours.
I got the lead role in the school play.
My basement is full of water.
I'm retiring at the end of this month.
The new software update broke everything.
I made a new friend at the gym.
I overslept and missed the first class.
My daughter graduates from college tomorrow.""".splitlines()
# 20 more messages, written after the 80 above and never trained on: the validation prompts on which the frontier
# picks PPO's checkpoint, so the held-out prompts of the final win rate play no part in choosing the model
valid_messages = """I got my test results back and everything is fine.
Our power went out in the middle of dinner.
I finally cleaned out the garage.
My flight was upgraded to business class.
I locked myself out of my apartment.
We won the neighborhood quiz night!
My favorite team traded away their best player.
I ran my first 10k without stopping.
The dentist says I need two fillings.
My little brother got into his dream university.
I broke my glasses and can't see a thing.
My paintings are going to be in a local gallery.
The washing machine flooded the kitchen.
I made it through my first week at the new job.
My roommate ate the leftovers I was saving.
We saw a whale on our boat trip today!
I have the flu and have to cancel my plans.
My grandfather taught me his old bread recipe.
The airline lost my suitcase.
I just paid off my student loans!""".splitlines()
frames = ["Reply to your friend in one short sentence. They wrote: \"{m}\"",
          "Write a one-sentence text message in response to: \"{m}\"",
          "Your coworker says: \"{m}\" Answer them in a single sentence.",
          "Respond briefly (one sentence) to this message: \"{m}\""]
random.seed(0)
random.shuffle(messages)
held, train = messages[:20], messages[20:]


def rows(ms: list[str]) -> list[dict]:
    # "group": the message, which a prompt's 4 framings share: train-rm holds out a message's rankings together
    # (igpt sample and label carry it from the prompt), and run.py clusters the gold win rate's interval by it
    return [{"prompt": f.format(m=m), "group": m} for m in ms for f in frames]


tr, ho = rows(train), rows(held)
random.shuffle(tr)
random.shuffle(ho)
va = rows(valid_messages)
random.Random(1).shuffle(va)
HERE = Path(__file__).resolve().parent
for name, records in (("prompts_train.jsonl", tr), ("prompts_heldout.jsonl", ho), ("prompts_valid.jsonl", va)):
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
print(f"{len(messages) + len(valid_messages)} messages: {len(tr)} training prompts, {len(va)} validation prompts, "
      f"{len(ho)} held-out prompts")
