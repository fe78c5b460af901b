"""The demo model's synthetic chat corpus: six small tasks with automatic checkers.

Every task draws questions from a fixed universe (number pairs, a word list,
a conversion table, a table of capitals) that is split once, by the fixed
``SPLIT_SEED``, into a training part and a held-out part; the ``seed`` of
``make_examples`` only chooses which questions are drawn. Held-out questions
never occur in training data:

* ``add``: unordered number pairs {a, b} with 0 <= a, b <= 99 (a held-out pair is
  never seen in either order);
* ``count``, ``spell``, ``reverse``: held-out words (never in any training example);
* ``convert``: (conversion, direction, amount) triples;
* ``capital``: (country, question template) combinations; every capital is
  taught, so held-out accuracy measures whether a fact learnt in some phrasings
  is recalled in another.

``solve(task, question)`` recomputes the answer from the question text alone
(it does not look at the generator's answer); ``check`` compares a model's
output with it: exact match after stripping surrounding whitespace.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional, Sequence

TASKS = ("add", "count", "spell", "reverse", "convert", "capital")
SPLITS = ("train", "heldout")
SPLIT_SEED = 20230718  # fixes the train/held-out split of every task (not the draws)
HELDOUT_SHARE = 0.12

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer with the answer only.",
    "Answer the question.",
)

# Short lowercase English words, 3-7 letters (written for this project).
WORDS = tuple("""
able acid aged also apple april arch area army atom aunt away baby back bake ball band
bank barn base bath beach bean bear beef bell belt bench bird bite black blade blue boat
body bone book boot bored bowl box brain bread brick bride brown brush bulb burn bus cake
calm camel camp candle card care carpet cart case castle cat cave chain chair chalk cheese
chess chin clay clock cloud coal coast coat coffee coin cold comb cook copper corn
cotton cow crab crane crow crown cup dance dark date dawn deer desk dinner dish dog doll
door dove dragon dream dress drink drum duck dust eagle early earth east egg elbow empty
engine eye face farm fast feather fence field film fire fish flag flame flat floor flour
flower fog foot forest fork fox frog fruit game garden gate ghost gift glass glove goat
gold grape grass green guitar hair hammer hand happy harbor hat heart heavy hill honey
hope horse hotel house ice idea iron island jacket jam jar jelly jewel juice jump kettle
key king kite knee knife lake lamp lemon light lion lip lizard lock long lunch
magic map maple market mask meat melon metal milk mint mirror money monkey moon moss
mouse mouth mud music nail neck nest net night noise north nose nut ocean oil onion
orange owl paint palace pan paper park party pear pen pencil pepper piano pig pillow pink
pipe planet plant plate pocket pond potato pride prince puzzle queen quiet rabbit rain
red rice ring river road robot rock roof room root rope rose salt sand school sea seed
shadow sheep shell ship shirt shoe silver sing sister skirt sky sleep slow smile snake
snow soap sock soft soup spoon spring star stone storm street sugar summer sun swan
table tail tea teeth tent thread tiger toast tomato tooth tower town toy train tree truck
tulip turtle uncle valley vase violin voice wagon wall water wave west whale wheat wheel
window wine winter wolf wood wool world yard yellow zebra
bottle ladder pearl kiwi
""".split())

# (country, capital)
CAPITALS = (
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Poland", "Warsaw"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Hungary", "Budapest"),
    ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Iran", "Tehran"), ("Turkey", "Ankara"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"),
    ("Australia", "Canberra"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"),
    ("Brazil", "Brasilia"), ("South Korea", "Seoul"),
)
CAPITAL_TEMPLATES = (
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Name the capital city of {c}.",
    "What city is {c}'s capital?",
)

# (unit, plural, bigger unit, plural, factor): 1 bigger unit = factor units.
CONVERSIONS = (
    ("centimeter", "centimeters", "meter", "meters", 100),
    ("millimeter", "millimeters", "centimeter", "centimeters", 10),
    ("meter", "meters", "kilometer", "kilometers", 1000),
    ("gram", "grams", "kilogram", "kilograms", 1000),
    ("milliliter", "milliliters", "liter", "liters", 1000),
    ("cent", "cents", "dollar", "dollars", 100),
    ("year", "years", "century", "centuries", 100),
)
CONVERT_TEMPLATES = (
    "How many {to} are in {n} {frm}?",
    "Convert {n} {frm} to {to}.",
)
MAX_AMOUNT = 99

ADD_TEMPLATES = (
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}.",
)
MAX_ADDEND = 99

COUNT_TEMPLATES = (
    "How many words are in: {words}?",
    "Count the words: {words}",
)
MAX_COUNT = 8

SPELL_TEMPLATES = (
    "Spell the word {w}.",
    "How do you spell {w}?",
    "Spell {w} letter by letter.",
)
REVERSE_TEMPLATES = (
    "Spell the word {w} backwards.",
    "Reverse the letters of {w}.",
    "Spell {w} in reverse.",
)


@dataclass(frozen=True)
class Example:
    task: str
    question: str
    answer: str


# ----------------------------------------------------------------------------- the splits


def _split(items: Sequence, share: float, salt: str) -> tuple[list, list]:
    """(train, held-out) parts of ``items``, fixed by SPLIT_SEED and ``salt``."""
    items = list(items)
    rng = random.Random(f"{SPLIT_SEED}:{salt}")
    order = list(range(len(items)))
    rng.shuffle(order)
    n = max(1, round(share * len(items)))
    held = set(order[:n])
    return ([x for i, x in enumerate(items) if i not in held],
            [x for i, x in enumerate(items) if i in held])


class _Universe:
    """Every task's training and held-out question space (built once)."""

    def __init__(self):
        pairs = [(a, b) for a in range(MAX_ADDEND + 1) for b in range(a, MAX_ADDEND + 1)]
        self.pairs = dict(zip(SPLITS, _split(pairs, HELDOUT_SHARE, "add")))
        self.words = dict(zip(SPLITS, _split(WORDS, HELDOUT_SHARE, "words")))
        triples = [(k, d, n) for k in range(len(CONVERSIONS)) for d in (0, 1)
                   for n in range(1, MAX_AMOUNT + 1)]
        self.conversions = dict(zip(SPLITS, _split(triples, HELDOUT_SHARE, "convert")))
        # One held-out template per country, spread evenly over the templates.
        combos = {"train": [], "heldout": []}
        rng = random.Random(f"{SPLIT_SEED}:capital")
        offset = rng.randrange(len(CAPITAL_TEMPLATES))
        for i, (country, _) in enumerate(CAPITALS):
            held = (i + offset) % len(CAPITAL_TEMPLATES)
            for t in range(len(CAPITAL_TEMPLATES)):
                combos["heldout" if t == held else "train"].append((i, t))
        self.capitals = combos


_U: Optional[_Universe] = None


def universe() -> _Universe:
    global _U
    if _U is None:
        _U = _Universe()
    return _U


# ----------------------------------------------------------------------------- generators


def _letters(word: str) -> str:
    return " ".join(word)


def _draw(task: str, rng: random.Random, split: str) -> Example:
    u = universe()
    if task == "add":
        a, b = rng.choice(u.pairs[split])
        if rng.random() < 0.5:
            a, b = b, a
        q = rng.choice(ADD_TEMPLATES).format(a=a, b=b)
        return Example(task, q, str(a + b))
    if task == "count":
        n = rng.randint(1, MAX_COUNT)
        words = [rng.choice(u.words[split]) for _ in range(n)]
        q = rng.choice(COUNT_TEMPLATES).format(words=" ".join(words))
        return Example(task, q, str(n))
    if task == "spell":
        w = rng.choice(u.words[split])
        return Example(task, rng.choice(SPELL_TEMPLATES).format(w=w), _letters(w))
    if task == "reverse":
        w = rng.choice(u.words[split])
        return Example(task, rng.choice(REVERSE_TEMPLATES).format(w=w), _letters(w[::-1]))
    if task == "convert":
        k, d, n = rng.choice(u.conversions[split])
        small, smalls, big, bigs, factor = CONVERSIONS[k]
        if d == 0:  # big -> small: n * factor
            frm, to, amount, answer = (big if n == 1 else bigs), smalls, n, n * factor
        else:  # small -> big: (n * factor) -> n
            frm, to, amount, answer = smalls, bigs, n * factor, n
        t = rng.choice(CONVERT_TEMPLATES)
        return Example(task, t.format(n=amount, frm=frm, to=to), str(answer))
    if task == "capital":
        i, t = rng.choice(u.capitals[split])
        country, capital = CAPITALS[i]
        return Example(task, CAPITAL_TEMPLATES[t].format(c=country), capital)
    raise ValueError(f"unknown task {task!r}")


def make_examples(task: str, n: int, seed: int, split: str = "train",
                  unique: bool = False) -> list[Example]:
    """``n`` examples of ``task`` from ``split`` (deterministic in ``seed``).

    ``unique`` returns distinct questions (up to as many as the split holds).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    rng = random.Random(f"{seed}:{task}:{split}")
    out: list[Example] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n and tries < 50 * n + 1000:
        tries += 1
        ex = _draw(task, rng, split)
        if unique:
            if ex.question in seen:
                continue
            seen.add(ex.question)
        out.append(ex)
    return out


def heldout_examples(n_per_task: int, seed: int = 0,
                     tasks: Sequence[str] = TASKS) -> dict[str, list[Example]]:
    """Distinct held-out questions per task (the evaluation sets)."""
    return {t: make_examples(t, n_per_task, seed, "heldout", unique=True) for t in tasks}


def to_messages(ex: Example, system: Optional[str] = None,
                history: Sequence[Example] = ()) -> list[dict]:
    """The Llama 2 chat dialog of an example (optional system prompt and earlier turns)."""
    msgs = [{"role": "system", "content": system}] if system else []
    for h in list(history) + [ex]:
        msgs += [{"role": "user", "content": h.question},
                 {"role": "assistant", "content": h.answer}]
    return msgs


def training_records(n_per_task: dict[str, int], seed: int, *, system_share: float = 0.15,
                     multi_turn_share: float = 0.15, raw_share: float = 0.1) -> list[dict]:
    """Shuffled training records: ``{"messages": [...]}`` chat dialogs, and a
    ``raw_share`` of ``{"raw": [question, answer]}`` (a bare prompt, for
    ``llama2 generate`` without ``--chat``; the training script turns them into
    BOS question answer EOS samples with loss on the answer only).
    """
    pools = {t: make_examples(t, n, seed, "train") for t, n in n_per_task.items()}
    examples = [ex for t in pools for ex in pools[t]]
    rng = random.Random(f"{seed}:records")
    rng.shuffle(examples)
    records = []
    for ex in examples:
        r = rng.random()
        if r < raw_share:
            records.append({"raw": [ex.question, ex.answer], "task": ex.task})
            continue
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < system_share else None
        history = [rng.choice(examples)] if rng.random() < multi_turn_share else []
        records.append({"messages": to_messages(ex, system, history), "task": ex.task})
    return records


# ----------------------------------------------------------------------------- checkers

_NUM = r"\d+"


def _match(patterns: Sequence[str], question: str) -> Optional[re.Match]:
    for p in patterns:
        m = re.fullmatch(p, question)
        if m:
            return m
    return None


def _template_regexes(templates: Sequence[str], fields: dict[str, str]) -> list[str]:
    out = []
    for t in templates:
        r = re.escape(t)
        for name, group in fields.items():
            r = r.replace(re.escape("{" + name + "}"), f"(?P<{name}>{group})")
        out.append(r)
    return out


_ADD_RE = _template_regexes(ADD_TEMPLATES, {"a": _NUM, "b": _NUM})
_COUNT_RE = _template_regexes(COUNT_TEMPLATES, {"words": r"[a-z]+(?: [a-z]+)*"})
_SPELL_RE = _template_regexes(SPELL_TEMPLATES, {"w": r"[a-z]+"})
_REVERSE_RE = _template_regexes(REVERSE_TEMPLATES, {"w": r"[a-z]+"})
_UNIT_NAMES = {}
for _small, _smalls, _big, _bigs, _factor in CONVERSIONS:
    for _name in (_small, _smalls):
        _UNIT_NAMES.setdefault(_name, {})[_big] = ("down", _factor)
        _UNIT_NAMES[_name][_bigs] = ("down", _factor)
    for _name in (_big, _bigs):
        _UNIT_NAMES.setdefault(_name, {})[_small] = ("up", _factor)
        _UNIT_NAMES[_name][_smalls] = ("up", _factor)
_CONVERT_RE = _template_regexes(CONVERT_TEMPLATES, {"n": _NUM, "frm": r"[a-z]+", "to": r"[a-z]+"})
_CAPITAL_RE = _template_regexes(CAPITAL_TEMPLATES, {"c": r".+"})
_CAPITAL_OF = dict(CAPITALS)


def solve(task: str, question: str) -> str:
    """The right answer to ``question``, computed from its text (ValueError if unparsable)."""
    if task == "add":
        m = _match(_ADD_RE, question)
        if m:
            return str(int(m["a"]) + int(m["b"]))
    elif task == "count":
        m = _match(_COUNT_RE, question)
        if m:
            return str(len(m["words"].split()))
    elif task in ("spell", "reverse"):
        m = _match(_SPELL_RE if task == "spell" else _REVERSE_RE, question)
        if m:
            w = m["w"]
            return _letters(w if task == "spell" else w[::-1])
    elif task == "convert":
        m = _match(_CONVERT_RE, question)
        if m:
            n, frm, to = int(m["n"]), m["frm"], m["to"]
            how = _UNIT_NAMES.get(frm, {}).get(to)
            if how is not None:
                kind, factor = how
                if kind == "up":
                    return str(n * factor)
                if n % factor == 0:
                    return str(n // factor)
    elif task == "capital":
        m = _match(_CAPITAL_RE, question)
        if m and m["c"] in _CAPITAL_OF:
            return _CAPITAL_OF[m["c"]]
    else:
        raise ValueError(f"unknown task {task!r}")
    raise ValueError(f"{task}: cannot parse question {question!r}")


def check(task: str, question: str, prediction: str) -> bool:
    """Whether ``prediction`` answers ``question`` (exact match after strip)."""
    return prediction.strip() == solve(task, question)
