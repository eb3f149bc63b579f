"""Phase-2 synthetic data: textbook prose, chat dialogues and the held-out evaluation sets.

Everything here is pure Python and deterministic: a generator given the same ``seed`` returns the same
data (``random.Random(seed)``), on any machine. The invented world (``WORLD``, the valley of Orvane)
is fixed in code, not drawn from a seed, so a model trained on any seed is evaluated on the same facts.

Held out from every generator: the 200 addition pairs of ``HELDOUT_ADDITION`` (in either order, in any
form: ``A + B``, ``add A and B``, ``A and B``, ``A or B``, ``A - B``, ``A plus B``, or a subtraction
``S - A = B`` that states the sum) and the names and topics of ``UNKNOWN_EVAL_NAMES`` /
``UNKNOWN_EVAL_TOPICS``. The generators draw every pair of numbers they join through ``_allowed`` and
take names from training pools disjoint from the evaluation pools; ``leaks`` checks a text for both
(the tests run it over many thousands of generated texts).

Reply styles of the dialogues: an addition is answered ``"The answer is S."`` (the sum is the first
number of the reply); a question about anything outside the valley is answered with a reply that
begins ``"I do not know."``.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from phi3mlx.errors import Phi3MLXError

# ---------------------------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class Person:
    name: str
    pronoun: str  # "she" or "he"
    home: str
    job: str
    age: int
    pet: str
    species: str
    colour: str
    sibling: Optional[str]
    friend: str


@dataclass(frozen=True)
class Place:
    name: str
    kind: str  # town, river, mountain, lake
    description: str  # "a town on the Ambrell river"
    known_for: str


@dataclass(frozen=True)
class Creature:
    name: str
    kind: str  # animal or plant
    description: str  # "a slow grey lizard"
    detail: str  # "eats clover and sleeps on warm stones"


@dataclass(frozen=True)
class Custom:
    name: str
    place: str
    season: str
    what: str  # what people do


@dataclass(frozen=True)
class World:
    valley: str
    places: tuple = field(default_factory=tuple)
    people: tuple = field(default_factory=tuple)
    creatures: tuple = field(default_factory=tuple)
    customs: tuple = field(default_factory=tuple)

    def person(self, name: str) -> Person:
        return next(p for p in self.people if p.name == name)


_P = Person
WORLD = World(
    valley="Orvane",
    places=(
        Place("Pellwick", "town", "a town on the Ambrell river", "its old stone bridge"),
        Place("Dunmarra", "town", "a town at the foot of Mount Caldor", "its wool market"),
        Place("Sorrelby", "town", "a village among the duskberry fields", "its berry jam"),
        Place("Hallowmere", "town", "a town on the shore of Lake Vessin", "its boat builders"),
        Place("Kestrin Ford", "town", "a village where the road crosses the Ambrell", "its tall windmill"),
        Place("Ambrell", "river", "the river that flows from Mount Caldor into Lake Vessin", "its clear cold water"),
        Place("Mount Caldor", "mountain", "the highest mountain of the valley", "the snow on its top"),
        Place("Lake Vessin", "lake", "the wide lake at the south end of the valley", "its silver fish"),
    ),
    people=(
        _P("Maren Tull", "she", "Pellwick", "baker", 34, "Pip", "goat", "green", "Tomas Tull", "Ilse Brannock"),
        _P("Tomas Tull", "he", "Dunmarra", "shepherd", 38, "Rook", "dog", "brown", "Maren Tull", "Oswin Farrow"),
        _P("Ilse Brannock", "she", "Hallowmere", "boat builder", 45, "Wick", "cat", "blue", "Edda Brannock",
           "Maren Tull"),
        _P("Edda Brannock", "she", "Hallowmere", "fisher", 19, "Sable", "skellin", "silver", "Ilse Brannock",
           "Jory Penhale"),
        _P("Oswin Farrow", "he", "Kestrin Ford", "miller", 52, "Bramble", "mossback", "yellow", None, "Tomas Tull"),
        _P("Jory Penhale", "he", "Sorrelby", "jam maker", 27, "Fennick", "hen", "purple", "Lusa Penhale",
           "Edda Brannock"),
        _P("Lusa Penhale", "she", "Sorrelby", "teacher", 31, "Moth", "cat", "orange", "Jory Penhale", "Cara Quill"),
        _P("Cara Quill", "she", "Pellwick", "healer", 61, "Tansy", "dog", "white", None, "Lusa Penhale"),
        _P("Dorran Vey", "he", "Dunmarra", "weaver", 43, "Nib", "mossback", "red", "Sefa Vey", "Halden Roe"),
        _P("Sefa Vey", "she", "Kestrin Ford", "carpenter", 24, "Quince", "goat", "black", "Dorran Vey",
           "Wenna Marsh"),
        _P("Halden Roe", "he", "Hallowmere", "lamp maker", 57, "Ash", "skellin", "grey", None, "Dorran Vey"),
        _P("Wenna Marsh", "she", "Sorrelby", "beekeeper", 36, "Clover", "dog", "gold", None, "Sefa Vey"),
        _P("Pell Garrow", "he", "Pellwick", "blacksmith", 49, "Cinder", "cat", "dark red", None, "Amos Tarrent"),
        _P("Amos Tarrent", "he", "Kestrin Ford", "ferryman", 66, "Puddle", "duck", "pale blue", None,
           "Pell Garrow"),
    ),
    creatures=(
        Creature("mossback", "animal", "a slow grey lizard with a green back", "eats clover and sleeps on warm stones"),
        Creature("skellin", "animal", "a small blue bird that can talk a little",
                 "sings at dawn and repeats short words"),
        Creature("glimmerfish", "animal", "a silver fish of Lake Vessin", "shines faintly at night"),
        Creature("emberroot", "plant", "a red root that grows on Mount Caldor", "is boiled to make a warm tea"),
        Creature("duskberry", "plant", "a purple berry of the fields near Sorrelby", "ripens at the end of summer"),
        Creature("silverbell", "plant", "a small white flower with bell-shaped petals",
                 "blooms by the Ambrell in spring"),
    ),
    customs=(
        Custom("the Lantern Walk", "Pellwick", "autumn", "carry paper lanterns along the Ambrell at night"),
        Custom("the River Fair", "Kestrin Ford", "spring", "race small boats on the Ambrell"),
        Custom("Stone Day", "Dunmarra", "summer", "climb Mount Caldor and leave a stone at the top"),
        Custom("the Berry Supper", "Sorrelby", "late summer", "share bread with duskberry jam"),
    ),
)

VALLEY = f"the valley of {WORLD.valley}"


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _relative(p: Person) -> str:
    """'sister' or 'brother': what p's sibling is to p."""
    return "sister" if WORLD.person(p.sibling).pronoun == "she" else "brother"


def world_facts() -> list[tuple[str, str, str]]:
    """Every fact of ``WORLD`` as (subject, relation, value), values as text."""
    facts = []
    for pl in WORLD.places:
        facts += [(pl.name, "is", pl.description), (pl.name, "kind", pl.kind), (pl.name, "known for", pl.known_for)]
    for p in WORLD.people:
        facts += [(p.name, "lives in", p.home), (p.name, "job", p.job), (p.name, "age", str(p.age)),
                  (p.name, "pet", p.pet), (p.name, "pet species", p.species), (p.pet, "species", p.species),
                  (p.name, "favourite colour", p.colour), (p.name, "friend", p.friend)]
        if p.sibling:
            facts.append((p.name, _relative(p), p.sibling))
    for c in WORLD.creatures:
        facts += [(c.name, "is", c.description), (c.name, "kind", c.kind), (c.name, "detail", c.detail)]
    for c in WORLD.customs:
        facts += [(c.name, "held in", c.place), (c.name, "season", c.season), (c.name, "custom", c.what)]
    return facts


@dataclass(frozen=True)
class _QA:
    questions: tuple  # phrasings of one question
    answer: str
    expected: str  # what a correct reply contains


def world_qas() -> list[_QA]:
    """The questions the chat data asks about the world, each with a few phrasings, its answer and the
    substring a correct answer holds."""
    qas = []
    for p in WORLD.people:
        n, poss = p.name, f"{p.name}'s"
        qas += [
            _QA((f"Where does {n} live?", f"Which town does {n} live in?", f"In which town does {n} live?"),
                f"{n} lives in {p.home}.", p.home),
            _QA((f"What is {poss} job?", f"What does {n} do for a living?", f"What work does {n} do?"),
                f"{n} is {_a(p.job)}.", p.job),
            _QA((f"How old is {n}?", f"What is {poss} age?"), f"{n} is {p.age} years old.", str(p.age)),
            _QA((f"What is the name of {poss} pet?", f"What is {poss} pet called?"),
                f"{poss} pet is {_a(p.species)} called {p.pet}.", p.pet),
            _QA((f"What kind of animal is {poss} pet?", f"What animal does {n} keep as a pet?"),
                f"{poss} pet {p.pet} is {_a(p.species)}.", p.species),
            _QA((f"What is {poss} favourite colour?", f"Which colour does {n} like best?"),
                f"{poss} favourite colour is {p.colour}.", p.colour),
            _QA((f"Who is {poss} best friend?", f"Who is {n} friends with?"),
                f"{poss} best friend is {p.friend}.", p.friend),
        ]
        if p.sibling:
            rel = _relative(p)
            qas.append(_QA((f"Who is {poss} {rel}?", f"Does {n} have a {rel}?"),
                           f"{poss} {rel} is {p.sibling}.", p.sibling))
    for pl in WORLD.places:
        qas += [_QA((f"What is {pl.name}?", f"Tell me about {pl.name}."),
                    f"{pl.name} is {pl.description} in {VALLEY}, known for {pl.known_for}.", pl.description),
                _QA((f"What is {pl.name} known for?", f"What is {pl.name} famous for?"),
                    f"{pl.name} is known for {pl.known_for}.", pl.known_for)]
    for c in WORLD.creatures:
        qas.append(_QA((f"What is {_a(c.name)}?", f"Tell me about the {c.name}."),
                       f"The {c.name} is {c.description}. It {c.detail}.", c.description))
    for c in WORLD.customs:
        title = c.name[0].upper() + c.name[1:]
        qas += [_QA((f"Where is {c.name} held?", f"In which town is {c.name}?"),
                    f"{title} is held in {c.place}.", c.place),
                _QA((f"When is {c.name}?", f"In which season is {c.name}?"),
                    f"{title} is in {c.season}.", c.season),
                _QA((f"What do people do at {c.name}?", f"What happens at {c.name}?"),
                    f"At {c.name}, people {c.what}.", c.what)]
    return qas


# ---------------------------------------------------------------------------------------------- held out

HELDOUT_SEED = 1729
HELDOUT_SIZE = 200


def _heldout_pairs() -> list[tuple[int, int]]:
    rng = random.Random(HELDOUT_SEED)
    pairs = [(a, b) for a in range(10, 100) for b in range(a, 100)]
    chosen = rng.sample(pairs, HELDOUT_SIZE)
    return [(a, b) if rng.random() < 0.5 else (b, a) for a, b in chosen]


HELDOUT_ADDITION: list[tuple[int, int]] = _heldout_pairs()
_HELDOUT = frozenset(HELDOUT_ADDITION) | frozenset((b, a) for a, b in HELDOUT_ADDITION)

# Names and topics of the "outside the world" evaluation: never in any training text.
UNKNOWN_EVAL_NAMES = ("Halvard Esk", "Yolen Starkweather", "Corwin Albery", "Nessa Drummelow", "Ulric Penfeather",
                      "Zadie Oakhollow", "Bertram Kilgallen", "Isolde Marrowby", "Fenwick Osgood", "Tamsin Rookwood",
                      "Gideon Hartsell", "Morwenna Blayde", "Percival Dunstable", "Olwen Fairbairn",
                      "Thaddeus Quarrington", "Rosalind Vantreight")
UNKNOWN_EVAL_PLACES = ("Glenharrow", "Brackwater Bay", "Mount Zephrine", "Thistlecombe")
UNKNOWN_EVAL_TOPICS = (
    ("What is the capital of Peru?", "Peru"), ("Who painted the Mona Lisa?", "Mona Lisa"),
    ("How far away is the Moon?", "Moon"), ("What is the largest ocean on Earth?", "ocean"),
    ("Who invented the telephone?", "telephone"), ("What language is spoken in Brazil?", "Brazil"),
    ("How many bones are in the human body?", "bones"), ("What is the boiling point of mercury?", "mercury"),
    ("Who was the first emperor of China?", "emperor"), ("What is photosynthesis?", "photosynthesis"),
)

# The training pools of the same kind (disjoint from the evaluation pools and from the world).
_UNKNOWN_NAMES = ("Tobrin Vasquel", "Quillan Hosk", "Brenna Calloway", "Dace Mortimer", "Elowen Strand",
                  "Garrick Pole", "Hestia Wren", "Ivo Lindqvist", "Juniper Kade", "Kellan Moss", "Lark Emberly",
                  "Mirelle Dusk", "Nico Barrowman", "Orla Finch", "Piers Whitlock", "Rhosyn Teague", "Soren Vale",
                  "Talia Brook", "Ansel Crane", "Viveca Thorne", "Wystan Hale", "Xander Pike", "Yara Gellert",
                  "Zeb Callister", "Quillan", "Merrit Osk", "Bastian Loor", "Cressida Pym")
_UNKNOWN_PLACES = ("Farrowdale", "Greywater", "Mount Belisk", "Lake Ondra", "Tessington", "Corrim Hill",
                   "Brightmoor", "Ashcombe")
_UNKNOWN_TOPICS = (
    "What is the capital of France?", "Who wrote Hamlet?", "How tall is the Eiffel Tower?",
    "What is the speed of light?", "Who was Napoleon?", "What is the population of Japan?",
    "How does a car engine work?", "What is the tallest mountain in the world?", "Who discovered gravity?",
    "What is the chemical formula of water?", "When did the Second World War end?", "What is a black hole?",
    "Who is the president of the United States?", "How many planets are in the solar system?",
    "What is the longest river in Africa?", "What is the weather like today?", "What year is it?",
    "Can you write a poem about the sea?", "What is the stock price of Apple?", "Who won the football match?",
    "What is the meaning of life?", "How do I cook rice?", "What is the capital of Germany?",
    "Who is Albert Einstein?",
)
_UNKNOWN_PERSON_Q = ("Who is {n}?", "Where does {n} live?", "What is {n}'s job?", "How old is {n}?",
                     "What is the name of {n}'s pet?", "What is {n}'s favourite colour?", "Tell me about {n}.")
_UNKNOWN_PLACE_Q = ("Where is {n}?", "What is {n} known for?", "Tell me about {n}.", "Who lives in {n}?")

_NUMBER = re.compile(r"\d+")
_OPERATORS = frozenset({"+", "-", "plus", "minus", "and", "or"})  # what joins two numbers of one exercise
_EVAL_ONLY = tuple(s.lower() for s in UNKNOWN_EVAL_NAMES + UNKNOWN_EVAL_PLACES) + tuple(
    t.lower() for _, t in UNKNOWN_EVAL_TOPICS)


def leaks(text: str) -> bool:
    """Whether ``text`` holds a held-out addition pair (two numbers joined by +, -, plus, minus, and or
    or; or ``S - A = B`` with (A, B) held out) or an evaluation-only name or topic."""
    nums = [(m.start(), m.end(), int(m.group())) for m in _NUMBER.finditer(text)]
    for i in range(len(nums) - 1):
        (_, e1, a), (s2, e2, b) = nums[i], nums[i + 1]
        op = text[e1:s2].strip().lower()
        if 10 <= b <= 99 and op in _OPERATORS:
            if (a, b) in _HELDOUT:
                return True
            if (op in ("-", "minus") and i + 2 < len(nums) and text[e2:nums[i + 2][0]].strip() == "="
                    and (b, nums[i + 2][2]) in _HELDOUT):
                return True
    low = text.lower()
    return any(s in low for s in _EVAL_ONLY)


def _allowed(a: int, b: int) -> bool:
    return (a, b) not in _HELDOUT


def _pair(rng: random.Random, lo: int = 10, hi: int = 99) -> tuple[int, int]:
    while True:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if _allowed(a, b):
            return a, b


# ---------------------------------------------------------------------------------------------- textbook

TEXTBOOK_KINDS = ("addition", "subtraction", "comparison", "counting", "units", "world", "story")
_PLACES_DIGITS = ("ones", "tens", "hundreds", "thousands")


def worked_addition(a: int, b: int) -> str:
    """``a + b`` worked column by column, every carry written out."""
    if a < 10 and b < 10:
        steps = ", ".join(str(a + i) for i in range(1, b + 1))
        return (f"To add {a} and {b}, start at {a} and count on {b}: {steps}. So {a} + {b} = {a + b}."
                if b else f"Adding 0 changes nothing: {a} + 0 = {a}.")
    da, db = str(a)[::-1], str(b)[::-1]
    cols = max(len(da), len(db))
    parts = [f"To add {a} and {b}, first add the ones:"]
    carry = 0
    for i in range(cols):
        digits = [int(d[i]) for d in (da, db) if i < len(d)] + ([carry] if carry else [])
        total = sum(digits)
        expr = " + ".join(map(str, digits)) + f" = {total}" if len(digits) > 1 else f"there is only {total}"
        lead = "" if i == 0 else f"Then add the {_PLACES_DIGITS[i]}: "
        if total >= 10:
            parts.append(f"{lead}{expr}. Write {total % 10} and carry 1.")
            carry = 1
        else:
            parts.append(f"{lead}{expr}. Write {total}.")
            carry = 0
    if carry:
        parts.append(f"There are no more digits, so the carried 1 becomes the {_PLACES_DIGITS[cols]} digit.")
    parts.append(f"So {a} + {b} = {a + b}.")
    return " ".join(parts)


def worked_subtraction(a: int, b: int) -> str:
    """``a - b`` (a >= b, both below 100) worked with the borrow written out."""
    a1, a0, b1, b0 = a // 10, a % 10, b // 10, b % 10
    if a0 >= b0:
        ones = f"first subtract the ones: {a0} - {b0} = {a0 - b0}."
        tens = f"Then subtract the tens: {a1} - {b1} = {a1 - b1}." if b1 else f"The tens stay {a1}."
    else:
        ones = (f"first look at the ones: {a0} is less than {b0}, so borrow 1 ten. "
                f"{a0 + 10} - {b0} = {a0 + 10 - b0}.")
        tens = f"Then subtract the tens: {a1} - 1 - {b1} = {a1 - 1 - b1}." if b1 else \
            f"Then the tens: {a1} - 1 = {a1 - 1}."
    return f"To subtract {b} from {a}, {ones} {tens} So {a} - {b} = {a - b}."


def _addition_doc(rng: random.Random) -> str:
    head = rng.choice(("Lesson: adding numbers", "Adding with carries", "Practice: addition",
                       "How to add two numbers", "Worked examples of addition"))
    items = []
    for _ in range(rng.randint(2, 4)):
        r = rng.random()
        if r < 0.7:
            a, b = _pair(rng)
        elif r < 0.82:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
        elif r < 0.9:
            a, b = rng.randint(1, 9), rng.randint(10, 99)
        else:
            a, b = rng.randint(100, 999), rng.randint(10, 999)
        items.append(worked_addition(a, b))
    intro = rng.choice(("We add numbers one column at a time, starting with the ones.",
                        "When a column adds up to 10 or more, we write the ones and carry 1 to the next column.",
                        "Adding is putting two amounts together.", ""))
    return "\n\n".join(x for x in (head, intro, *items) if x)


def _subtraction_doc(rng: random.Random) -> str:
    items = []
    for _ in range(rng.randint(2, 3)):
        while True:
            a, b = sorted((rng.randint(10, 99), rng.randint(1, 99)), reverse=True)
            if _allowed(a, b) and _allowed(b, a - b):
                break
        items.append(worked_subtraction(a, b))
    head = rng.choice(("Lesson: taking away", "Subtraction with borrowing", "Practice: subtraction"))
    return "\n\n".join([head, "Subtraction takes one amount away from another. We start with the ones."] + items)


def _compare(a: int, b: int, larger: bool) -> str:
    word = "larger" if larger else "smaller"
    ans = max(a, b) if larger else min(a, b)
    other = b if ans == a else a
    q = f"Which is {word}, {a} or {b}?"
    if a == b:
        return f"{q} They are the same number, so neither is {word}."
    if len(str(a)) != len(str(b)):
        why = (f"{max(a, b)} has more digits than {min(a, b)}" if larger
               else f"{min(a, b)} has fewer digits than {max(a, b)}")
    elif a // 10 != b // 10:
        more = "more" if larger else "less"
        why = f"{ans // 10} tens is {more} than {other // 10} tens"
    else:
        more = "more" if larger else "less"
        why = f"both have {a // 10} tens, and {ans % 10} ones is {more} than {other % 10} ones"
    return f"{q} {ans} is {word}, because {why}."


def _comparison_doc(rng: random.Random) -> str:
    items = []
    for _ in range(rng.randint(3, 5)):
        r = rng.random()
        if r < 0.3:  # the same digits swapped: 63 and 36
            while True:
                x, y = rng.randint(1, 9), rng.randint(1, 9)
                a, b = 10 * x + y, 10 * y + x
                if x != y and y and _allowed(a, b):
                    break
        elif r < 0.8:
            a, b = _pair(rng)
        else:
            a, b = rng.randint(1, 9), rng.randint(10, 99)
            if rng.random() < 0.5:
                a, b = b, a
        items.append(_compare(a, b, rng.random() < 0.6))
    return "\n".join(["Comparing numbers", "To compare two numbers, first look at how many digits they have, "
                      "then at the tens, then at the ones."] + items)


_ITEMS = (("apple", "apples"), ("pear", "pears"), ("plum", "plums"), ("stone", "stones"), ("shell", "shells"),
          ("duskberry", "duskberries"), ("egg", "eggs"), ("loaf", "loaves"), ("lantern", "lanterns"),
          ("feather", "feathers"), ("boat", "boats"), ("silverbell", "silverbells"))
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve")


def _counting_doc(rng: random.Random) -> str:
    p = rng.choice(WORLD.people)
    kinds = rng.sample(_ITEMS, rng.randint(2, 3))
    counts = [rng.randint(1, 9) for _ in kinds]
    bag = [k for k, c in zip(kinds, counts) for _ in range(c)]
    rng.shuffle(bag)
    listed = ", ".join(_a(k[0]) for k in bag)
    target = rng.randrange(len(kinds))
    (one, many), n = kinds[target], counts[target]
    tally = ", ".join(str(i) for i in range(1, n + 1))
    noun = one if n == 1 else many
    lines = [f"Counting with {p.name}",
             f"{p.name} has a basket. In it {p.pronoun} finds {listed}.",
             f"How many {many} are there? Let us count the {many} one by one: {tally}. "
             f"There {'is' if n == 1 else 'are'} {n} {noun}, {_NUMBER_WORDS[n]} in words."]
    if rng.random() < 0.5:
        total = len(bag)
        lines.append(f"Counting everything in the basket gives {', '.join(str(i) for i in range(1, total + 1))}. "
                     f"There are {total} things in the basket.")
    return "\n".join(lines)


def _units(n: int, one: str) -> str:
    return f"{n} {one if n == 1 else one + 's'}"


# (title, big unit, small unit, small units in one big unit, most big units, small amounts to add)
_UNIT_KINDS = (("Metres and centimetres", "metre", "centimetre", 100, 9, range(1, 100)),
               ("Hours and minutes", "hour", "minute", 60, 5, range(1, 60)),
               ("Kilograms and grams", "kilogram", "gram", 1000, 9, range(100, 1000, 100)))


def _units_doc(rng: random.Random) -> str:
    title, big, small, factor, most, extra = rng.choice(_UNIT_KINDS)
    lines = [title, f"One {big} is {factor} {small}s."]
    for _ in range(rng.randint(2, 3)):
        n, k = rng.randint(1, most), rng.choice(extra)
        whole = f"{_units(n, big)} is {n} x {factor} = {_units(n * factor, small)}."
        if rng.random() < 0.6 and _allowed(n * factor, k):
            lines.append(f"How many {small}s are {_units(n, big)} and {_units(k, small)}? {whole} "
                         f"{n * factor} + {k} = {n * factor + k}, so the answer is {_units(n * factor + k, small)}.")
        else:
            lines.append(whole[0].upper() + whole[1:])
    return "\n".join(lines)


def _person_sentences(p: Person, rng: random.Random) -> list[str]:
    pro, cap = p.pronoun, p.pronoun.capitalize()
    poss = "her" if pro == "she" else "his"
    out = [rng.choice((f"{p.name} lives in {p.home}.", f"{p.name} is from {p.home}.",
                       f"The town of {p.home} is home to {p.name}.")),
           rng.choice((f"{cap} works as {_a(p.job)}.", f"{p.name} is {_a(p.job)}.",
                       f"By trade, {p.name} is {_a(p.job)}.")),
           rng.choice((f"{cap} is {p.age} years old.", f"{p.name} is {p.age} years old.")),
           rng.choice((f"{cap} has {_a(p.species)} called {p.pet}.", f"{poss.capitalize()} pet {p.pet} is "
                       f"{_a(p.species)}.", f"{p.name} keeps {_a(p.species)} named {p.pet}.")),
           rng.choice((f"{poss.capitalize()} favourite colour is {p.colour}.", f"{cap} likes {p.colour} best of "
                       "all colours.")),
           rng.choice((f"{poss.capitalize()} best friend is {p.friend}.", f"{p.name} and {p.friend} are best "
                       "friends."))]
    if p.sibling:
        out.append(f"{poss.capitalize()} {_relative(p)} is {p.sibling}.")
    return out


def _world_doc(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.55:
        p = rng.choice(WORLD.people)
        sents = _person_sentences(p, rng)
        first, rest = sents[0], sents[1:]
        rng.shuffle(rest)
        return f"About {p.name}\n" + " ".join([first] + rest)
    if r < 0.75:
        pl = rng.choice(WORLD.places)
        people = [p.name for p in WORLD.people if p.home == pl.name]
        text = [f"{pl.name} is {pl.description} in {VALLEY}.", f"It is known for {pl.known_for}."]
        if people:
            text.append(f"People who live in {pl.name} include {', '.join(people)}.")
        for c in WORLD.customs:
            if c.place == pl.name:
                text.append(f"Every {c.season}, {c.name} is held there: people {c.what}.")
        return f"The {pl.kind} of {pl.name}\n" + " ".join(text)
    if r < 0.9:
        c = rng.choice(WORLD.creatures)
        keepers = [p.name for p in WORLD.people if p.species == c.name]
        text = [f"The {c.name} is {c.description}.", f"It {c.detail}.",
                f"The {c.name} is {_a(c.kind)} of {VALLEY}."]
        if keepers:
            text.append(f"{' and '.join(keepers)} {'keeps one' if len(keepers) == 1 else 'each keep one'} as a pet.")
        return f"The {c.name}\n" + " ".join(text)
    c = rng.choice(WORLD.customs)
    return (f"{c.name[0].upper() + c.name[1:]}\n{c.name[0].upper() + c.name[1:]} is held in {c.place} every "
            f"{c.season}. On that day people {c.what}.")


def _story_doc(rng: random.Random) -> str:
    p = rng.choice(WORLD.people)
    friend = WORLD.person(p.friend)
    pro, cap = p.pronoun, p.pronoun.capitalize()
    poss = "her" if pro == "she" else "his"
    when = rng.choice(("One morning", "One evening", "On a rainy day", "One bright day", "Early one spring"))
    s = [f"{when} in {p.home}, {p.name} the {p.job} finished {poss} work.",
         f"{p.pet}, {poss} {p.species}, was waiting by the door."]
    s.append(rng.choice((f"{cap} put on {poss} {p.colour} coat, because {p.colour} is {poss} favourite colour.",
                         f"{cap} tied a {p.colour} ribbon to {poss} bag. {p.colour.capitalize()} is {poss} "
                         "favourite colour.")))
    if friend.home == p.home:
        s.append(f"Together they walked across {p.home} to see {poss} best friend {friend.name}, "
                 f"the {friend.job}.")
    else:
        s.append(f"Together they walked from {p.home} to {friend.home} to visit {poss} best friend "
                 f"{friend.name}, the {friend.job}.")
    s.append(rng.choice((f"{friend.name} was glad to see them, and {friend.pet} the {friend.species} came out too.",
                         f"{friend.name} made tea from emberroot, and they talked until the sun went down.",
                         "They sat by the Ambrell and watched the water go by.")))
    if p.sibling and rng.random() < 0.5:
        s.append(f"On the way home {p.name} met {poss} {_relative(p)}, {p.sibling}, and told "
                 f"{'her' if WORLD.person(p.sibling).pronoun == 'she' else 'him'} about the day.")
    s.append(rng.choice((f"At {p.age}, {p.name} still loves a long walk.",
                         f"It was a good day in {VALLEY}.", f"{p.pet} fell asleep as soon as they were home.")))
    return " ".join(s)


_TEXTBOOK: dict[str, Callable[[random.Random], str]] = {
    "addition": _addition_doc, "subtraction": _subtraction_doc, "comparison": _comparison_doc,
    "counting": _counting_doc, "units": _units_doc, "world": _world_doc, "story": _story_doc}


def textbook_documents(n: int, seed: int = 0) -> list[str]:
    """``n`` textbook-style documents, the kinds of ``TEXTBOOK_KINDS`` in turn (balanced), deterministic."""
    rng = random.Random(seed)
    order = list(TEXTBOOK_KINDS)
    out = []
    for i in range(n):
        if i % len(order) == 0:
            rng.shuffle(order)
        out.append(_TEXTBOOK[order[i % len(order)]](rng))
    return out


# ---------------------------------------------------------------------------------------------- dialogues

CHAT_SHARES = {"addition": 0.50, "world": 0.30, "unknown": 0.15, "other": 0.05}
ADDITION_FORMS = ("What is {a} + {b}?", "{a} + {b} = ?", "Add {a} and {b}.")
ADDITION_REPLY = "The answer is {s}."
UNKNOWN_REPLY = "I do not know."
SYSTEM_PROMPTS = ("You are a helpful assistant.", f"You are a small model that knows arithmetic and {VALLEY}.",
                  "Answer briefly.")
TWO_TURN_SHARE = 0.1
SYSTEM_SHARE = 0.1
_WHO = f"I am a small model that knows arithmetic and {VALLEY}."
_OTHER = (
    (("Hello!", "Hi!", "Good morning.", "Hello there."), f"Hello! {_WHO} Ask me a sum or about the valley."),
    (("Who are you?", "What are you?", "Tell me about yourself."), _WHO),
    (("What can you do?", "What do you know?"), f"I can add numbers and answer questions about {VALLEY}."),
    (("Thank you!", "Thanks."), "You are welcome."),
    (("Where are you from?",), f"I was made to know {VALLEY}, with its towns, people and customs."),
)
_UNKNOWN_TAILS = ("{n} is not someone I know in {v}.", "I only know arithmetic and {v}.",
                  "{n} is not a place I know in {v}.", "That is outside what I know.")


def addition_prompt(a: int, b: int, form: int) -> str:
    return ADDITION_FORMS[form].format(a=a, b=b)


def _unknown_exchange(rng: random.Random) -> tuple[str, str]:
    r = rng.random()
    if r < 0.5:
        n = rng.choice(_UNKNOWN_NAMES)
        return rng.choice(_UNKNOWN_PERSON_Q).format(n=n), \
            f"{UNKNOWN_REPLY} {_UNKNOWN_TAILS[0].format(n=n, v=VALLEY)}"
    if r < 0.7:
        n = rng.choice(_UNKNOWN_PLACES)
        return rng.choice(_UNKNOWN_PLACE_Q).format(n=n), \
            f"{UNKNOWN_REPLY} {_UNKNOWN_TAILS[2].format(n=n, v=VALLEY)}"
    return rng.choice(_UNKNOWN_TOPICS), f"{UNKNOWN_REPLY} {_UNKNOWN_TAILS[1].format(v=VALLEY)}"


class _Dialogues:
    """The state of one ``chat_dialogues`` call: the random source and the addition form counter."""

    def __init__(self, seed: int, shares: Optional[dict] = None):
        self.rng = random.Random(seed)
        self.forms = 0
        self.qas = world_qas()
        self.shares = shares or CHAT_SHARES

    def exchange(self, kind: str) -> tuple[str, str]:
        rng = self.rng
        if kind == "addition":
            a, b = _pair(rng)
            form = self.forms % len(ADDITION_FORMS)
            self.forms += 1
            return addition_prompt(a, b, form), ADDITION_REPLY.format(s=a + b)
        if kind == "world":
            qa = rng.choice(self.qas)
            return rng.choice(qa.questions), qa.answer
        if kind == "unknown":
            return _unknown_exchange(rng)
        qs, reply = rng.choice(_OTHER)
        return rng.choice(qs), reply

    def kind(self) -> str:
        r, acc = self.rng.random(), 0.0
        total = sum(self.shares.values())
        for k, share in self.shares.items():
            acc += share / total
            if r < acc:
                return k
        return "other"

    def dialogue(self) -> list[dict]:
        rng = self.rng
        msgs = []
        if rng.random() < SYSTEM_SHARE:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(2 if rng.random() < TWO_TURN_SHARE else 1):
            q, a = self.exchange(self.kind())
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs


def chat_dialogues(n: int, seed: int = 0, shares: Optional[dict] = None) -> list[list[dict]]:
    """``n`` chat conversations (message lists), the kinds in ``shares`` (default ``CHAT_SHARES``; any
    weights over its kinds, normalised), deterministic.

    Additions cycle through ``ADDITION_FORMS`` (equal shares) and are answered ``ADDITION_REPLY``;
    questions outside the world are answered with a reply that starts ``UNKNOWN_REPLY``."""
    unknown = sorted(set(shares or {}) - set(CHAT_SHARES))
    if unknown:
        raise Phi3MLXError(f"unknown dialogue kinds {', '.join(unknown)} (known: {', '.join(CHAT_SHARES)})")
    if shares is not None and not (all(v >= 0 for v in shares.values()) and sum(shares.values()) > 0):
        raise Phi3MLXError(f"dialogue shares must be non-negative and sum to a positive number, got {shares}")
    state = _Dialogues(seed, shares)
    return [state.dialogue() for _ in range(n)]


# ---------------------------------------------------------------------------------------------- evaluation


def eval_sets() -> dict:
    """The held-out evaluation: ``{"addition": [(prompt, A, B, S)] * 200, "world": [(question, expected)],
    "unknown": [question]}``. Additions cycle through the three forms; world questions take each fact's
    phrasings in turn; unknown questions use names and topics no training text holds."""
    addition = [(addition_prompt(a, b, i % len(ADDITION_FORMS)), a, b, a + b)
                for i, (a, b) in enumerate(HELDOUT_ADDITION)]
    world = [(qa.questions[i % len(qa.questions)], qa.expected) for i, qa in enumerate(world_qas())]
    unknown = []
    for i, n in enumerate(UNKNOWN_EVAL_NAMES):
        unknown.append(_UNKNOWN_PERSON_Q[i % len(_UNKNOWN_PERSON_Q)].format(n=n))
    for i, n in enumerate(UNKNOWN_EVAL_PLACES):
        unknown.append(_UNKNOWN_PLACE_Q[i % len(_UNKNOWN_PLACE_Q)].format(n=n))
    unknown += [q for q, _ in UNKNOWN_EVAL_TOPICS]
    return {"addition": addition, "world": world, "unknown": unknown}


SELECTION_SEED = 4242


def selection_sets() -> dict:
    """Questions for choosing among a run's checkpoints, in ``eval_sets()``'s layout and never the held-out
    ones: 200 addition pairs drawn like the training pairs (so training may have seen them; held-out pairs
    excluded), each world fact in its next phrasing, and unknowns about the training pools' names and
    places. Picking a checkpoint by these leaves ``eval_sets()`` an unbiased final score."""
    rng = random.Random(SELECTION_SEED)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < HELDOUT_SIZE:
        a, b = _pair(rng)
        if (a, b) not in pairs:
            pairs.append((a, b))
    addition = [(addition_prompt(a, b, i % len(ADDITION_FORMS)), a, b, a + b) for i, (a, b) in enumerate(pairs)]
    world = [(qa.questions[(i + 1) % len(qa.questions)], qa.expected) for i, qa in enumerate(world_qas())]
    unknown = [_UNKNOWN_PERSON_Q[i % len(_UNKNOWN_PERSON_Q)].format(n=n) for i, n in enumerate(_UNKNOWN_NAMES)]
    unknown += [_UNKNOWN_PLACE_Q[i % len(_UNKNOWN_PLACE_Q)].format(n=n) for i, n in enumerate(_UNKNOWN_PLACES)]
    return {"addition": addition, "world": world, "unknown": unknown}


_INT = re.compile(r"-?\d+")


def first_number(reply: str) -> Optional[int]:
    """The first integer in ``reply`` (a leading minus sign included), or None."""
    m = _INT.search(reply or "")
    return int(m.group()) if m else None


def addition_correct(reply: str, s: int) -> bool:
    """Whether the first number of ``reply`` is the sum ``s``."""
    return first_number(reply) == s


def world_correct(reply: str, expected: str) -> bool:
    """Whether ``reply`` contains ``expected`` (case-insensitive) and does not refuse."""
    return expected.lower() in (reply or "").lower() and not says_unknown(reply)


def says_unknown(reply: str) -> bool:
    """Whether ``reply`` says "I do not know" anywhere (case-insensitive; "I don't know" counts too)."""
    low = (reply or "").lower().replace("\u2019", "'")
    return "i do not know" in low or "i don't know" in low


# ---------------------------------------------------------------------------------------------- files


def write_jsonl(rows: Iterable, path) -> int:
    """Write one JSON object a line to ``path`` atomically (a temporary file beside it, then a rename);
    returns the number of rows. On any failure ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n
