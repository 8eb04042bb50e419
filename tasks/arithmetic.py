"""
Arithmetic: multi-step word problems generated from templates (shopping, travel, sharing,
saving, baking, reading, gardening, ages, wages), the offline stand-in for GSM8K. Solutions
call the calculator tool for every step and end with a checkable "#### N", as GSM8K's do.

Not for: running the tool (nanochat/engine.py), or testing math beyond integer + - * //.

Example i of a split comes from an RNG seeded with ("Arithmetic", split, i), so the same index
always gives the same problem and train and test draw from different streams. Every python
call's output is what Python prints for that expression, so the tool's real output during
sampling matches the training data.
"""

import random

from tasks.common import Task, assistant_text, final_answers_match

NAMES = ("Ava", "Ben", "Chloe", "Daniel", "Emma", "Farah", "George", "Hana", "Ivan", "Julia",
         "Kofi", "Lena", "Mateo", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq")
ITEMS = (("notebook", "notebooks"), ("pencil", "pencils"), ("apple", "apples"), ("book", "books"),
         ("shirt", "shirts"), ("ticket", "tickets"), ("candle", "candles"), ("mug", "mugs"))
THINGS = (("marbles", "marble"), ("stickers", "sticker"), ("cookies", "cookie"), ("stamps", "stamp"),
          ("shells", "shell"), ("cards", "card"))


class _Solution:
    """Builds the assistant's content parts: prose, and calculator calls with their outputs."""

    def __init__(self):
        self.parts = []

    def say(self, text):
        self.parts.append({"type": "text", "text": text})

    def calc(self, expr):
        """Append a python call for `expr` and the output Python prints for it; return the value."""
        # eval of our own template strings (integers and + - * // only), never of user input
        value = eval(expr, {"__builtins__": {}})
        self.parts.append({"type": "python", "text": expr})
        self.parts.append({"type": "python_output", "text": str(value)})
        return value


def _shopping(rng, sol):
    name = rng.choice(NAMES)
    (one1, many1), (one2, many2) = rng.sample(ITEMS, 2)
    a, p, b, q = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 15)
    bill = next(x for x in (20, 50, 100, 200, 500) if x >= a * p + b * q)
    question = (f"{name} buys {a} {many1} for ${p} each and {b} {many2} for ${q} each, and pays with a "
                f"${bill} bill. How much change does {name} get, in dollars?")
    sol.say(f"The {many1} cost ")
    x = sol.calc(f"{a}*{p}")
    sol.say(f" dollars and the {many2} cost ")
    y = sol.calc(f"{b}*{q}")
    sol.say(" dollars, so the total is ")
    total = sol.calc(f"{x}+{y}")
    sol.say(" dollars. The change is ")
    return question, sol.calc(f"{bill}-{total}")


def _travel(rng, sol):
    s1, h1, s2, h2 = rng.randint(30, 120), rng.randint(2, 5), rng.randint(30, 120), rng.randint(2, 5)
    vehicle = rng.choice(("train", "car", "bus", "truck"))
    question = (f"A {vehicle} travels at {s1} km per hour for {h1} hours, then at {s2} km per hour "
                f"for {h2} hours. How many kilometers does it travel in total?")
    sol.say("In the first part it covers ")
    d1 = sol.calc(f"{s1}*{h1}")
    sol.say(" km, and in the second part ")
    d2 = sol.calc(f"{s2}*{h2}")
    sol.say(" km. In total that is ")
    return question, sol.calc(f"{d1}+{d2}")


def _sharing(rng, sol):
    name = rng.choice(NAMES)
    things, _ = rng.choice(THINGS)
    each, k, gift = rng.randint(2, 20), rng.randint(2, 8), rng.randint(1, 30)
    n = each * k + gift
    question = (f"{name} has {n} {things}, gives {gift} of them to a neighbor and shares the rest "
                f"equally among {k} friends. How many {things} does each friend get?")
    sol.say(f"After the gift {name} has ")
    rest = sol.calc(f"{n}-{gift}")
    sol.say(f" {things} left. Shared among {k} friends, each gets ")
    return question, sol.calc(f"{rest}//{k}")


def _saving(rng, sol):
    name = rng.choice(NAMES)
    w, weeks = rng.randint(5, 50), rng.randint(2, 12)
    spend = rng.randint(1, w * weeks)
    thing = rng.choice(("bicycle", "video game", "jacket", "concert ticket", "pair of shoes"))
    question = (f"{name} saves ${w} every week for {weeks} weeks, then spends ${spend} on a {thing}. "
                f"How many dollars does {name} have left?")
    sol.say(f"{name} saves ")
    saved = sol.calc(f"{w}*{weeks}")
    sol.say(f" dollars in total. After buying the {thing}, {name} has ")
    return question, sol.calc(f"{saved}-{spend}")


def _baking(rng, sol):
    batches, per_batch, box = rng.randint(2, 8), rng.randint(6, 30), rng.randint(2, 12)
    total = batches * per_batch
    while total <= box:
        batches += 1
        total = batches * per_batch
    boxes = rng.randint(1, (total - 1) // box)
    sold = total - box * boxes
    question = (f"A bakery bakes {batches} batches of {per_batch} cookies. It sells {sold} cookies and "
                f"packs the rest into boxes of {box}. How many boxes does it fill?")
    sol.say("The bakery bakes ")
    baked = sol.calc(f"{batches}*{per_batch}")
    sol.say(" cookies. After selling some, ")
    rest = sol.calc(f"{baked}-{sold}")
    sol.say(" are left, which fill ")
    return question, sol.calc(f"{rest}//{box}")


def _reading(rng, sol):
    name = rng.choice(NAMES)
    per_day, days = rng.randint(5, 40), rng.randint(2, 10)
    pages = per_day * days + rng.randint(1, 200)
    question = (f"A book has {pages} pages. {name} reads {per_day} pages a day for {days} days. "
                f"How many pages are left to read?")
    sol.say(f"{name} reads ")
    read = sol.calc(f"{per_day}*{days}")
    sol.say(" pages, so the pages left are ")
    return question, sol.calc(f"{pages}-{read}")


def _garden(rng, sol):
    name = rng.choice(NAMES)
    rows, per_row = rng.randint(2, 12), rng.randint(3, 15)
    dead, new = rng.randint(1, rows * per_row - 1), rng.randint(1, 30)
    question = (f"{name}'s garden has {rows} rows of {per_row} plants. {dead} plants die, and {name} "
                f"plants {new} new ones. How many plants are in the garden now?")
    sol.say("At first there are ")
    plants = sol.calc(f"{rows}*{per_row}")
    sol.say(" plants. Now there are ")
    return question, sol.calc(f"{plants}-{dead}+{new}")


def _ages(rng, sol):
    name = rng.choice(NAMES)
    age, older, times, years = rng.randint(3, 15), rng.randint(1, 6), rng.randint(2, 3), rng.randint(1, 20)
    question = (f"{name} is {age} years old. {name}'s cousin is {older} years older, and their aunt is "
                f"{times} times as old as the cousin. How old will the aunt be in {years} years?")
    sol.say("The cousin is ")
    cousin = sol.calc(f"{age}+{older}")
    sol.say(" years old, so the aunt is ")
    aunt = sol.calc(f"{cousin}*{times}")
    sol.say(f" now. In {years} years she will be ")
    return question, sol.calc(f"{aunt}+{years}")


def _wages(rng, sol):
    name = rng.choice(NAMES)
    hours, rate, days, weeks = rng.randint(2, 9), rng.randint(8, 40), rng.randint(1, 6), rng.randint(1, 4)
    question = (f"{name} works {hours} hours a day, {days} days a week, and earns ${rate} an hour. "
                f"How many dollars does {name} earn in {weeks} weeks?")
    sol.say(f"In a day {name} earns ")
    daily = sol.calc(f"{hours}*{rate}")
    sol.say(" dollars, in a week ")
    weekly = sol.calc(f"{daily}*{days}")
    sol.say(f" dollars, and in {weeks} weeks ")
    return question, sol.calc(f"{weekly}*{weeks}")


TEMPLATES = (_shopping, _travel, _sharing, _saving, _baking, _reading, _garden, _ages, _wages)


class Arithmetic(Task):
    """Generated multi-step word problems. Generative; graded by the number after "####".

    split: "train" or "test"; size: how many problems the task holds.

    Raises:
        ValueError: an unknown split or a negative size.
    """

    def __init__(self, split="train", size=1000, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"Arithmetic split must be 'train' or 'test', got {split!r}")
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be an int >= 0, got {size!r}")
        self.split, self.size = split, size

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(f"Arithmetic-{self.split}-{index}")
        sol = _Solution()
        question, answer = rng.choice(TEMPLATES)(rng, sol)
        sol.say(f". The answer is {answer}.\n\n#### {answer}")
        return {"messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": sol.parts},
        ]}

    def evaluate(self, conversation, completion):
        """True if the number after "####" in `completion` equals the reference answer."""
        return final_answers_match(assistant_text(conversation), completion)
