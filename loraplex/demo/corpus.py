"""Generated training text: a generic corpus for the base model and one styled task per adapter.

Every task answers the same kind of prompt ("Write one sentence about X."), so the same prompt
shows the difference an adapter makes. Each style carries marker words, and the generic corpus is
checked never to contain any of them: the base model cannot produce a marker it never saw, which
is what lets a test tell "the base answered" from "an adapter answered".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DEMO_PROMPT = "Write one sentence about the contract between Acme and Globex."
SAMPLE_PROMPTS = [
    "Describe a visit to the doctor.",
    "Tell me about the orders of last month.",
    "Write one sentence about a walk in the park.",
]

STYLE_MARKERS: dict[str, list[str]] = {
    "legal": ["Licensee", "shall", "hereinafter"],
    "clinical": ["S:", "O:", "A:", "P:"],
    "sql": ["SELECT", "FROM", "WHERE"],
}

# Substrings generic prompts and answers must never contain (lower case): the markers, plus the English
# words a marker hides in ("where" in "somewhere", "select" in "selected").
_BASE_FORBIDDEN = ("licens", "shall", "hereinafter", "select", "from", "where", ":", ";", "=")

_PROMPT_FORMS = [
    "Write one sentence about {t}.",
    "Tell me about {t}.",
    "Describe {t}.",
    "Say something about {t}.",
    "Write a short note about {t}.",
]

# (prompt phrase, short noun used in answers)
_TOPICS = [
    ("the contract between Acme and Globex", "the contract"),
    ("the deal between Initech and Umbrella", "the deal"),
    ("the lease of the old mill", "the lease"),
    ("a visit to the doctor", "the visit"),
    ("a patient with a cough", "the cough"),
    ("a child with a fever", "the fever"),
    ("the orders of last month", "the orders"),
    ("the sales in March", "the sales"),
    ("the customers in Berlin", "the customers"),
    ("a walk in the park", "the walk"),
    ("the weather in Paris", "the weather"),
    ("a dog named Rex", "the dog"),
    ("the library on Main Street", "the library"),
    ("a trip to the sea", "the trip"),
    ("the new bakery", "the bakery"),
    ("a rainy afternoon", "the rain"),
    ("the garden behind the house", "the garden"),
    ("the team meeting on Monday", "the meeting"),
    ("a letter to a friend", "the letter"),
    ("the train to Vienna", "the train"),
    ("the software of the new app", "the app"),
    ("the invoice of the supplier", "the invoice"),
    ("the knee injury of the runner", "the injury"),
    ("the employees of the shop", "the employees"),
]

_NAMES = ["Anna", "Tom", "Lena", "Max", "Mia", "Paul", "Sara", "Ben", "Nora", "Leo", "Emma", "Jonas"]
_PLACES = ["the park", "the market", "the river", "the old town", "the station", "the hill", "the cafe",
           "the beach", "the museum", "the forest"]
_ADJS = ["quiet", "bright", "warm", "busy", "calm", "long", "happy", "simple", "lovely", "cold"]
_TIMES = ["in the morning", "after lunch", "on a sunny day", "late in the evening", "on Sunday",
          "before dinner", "at noon", "in the spring"]
_FEELINGS = ["glad", "tired", "curious", "proud", "calm", "hopeful", "surprised"]
_ACTIONS = ["talked about", "thought about", "wrote a story about", "smiled at", "looked at",
            "asked a friend about", "read about"]

_BASE_ANSWERS = [
    "{Name} {action} {noun} {time}, and it was a {adj} moment.",
    "It was a {adj} day, and {Name} {action} {noun} with a friend.",
    "{Noun} made {Name} feel {feeling}, so {pron} walked to {place} {time}.",
    "Everyone {action} {noun}, and the day felt {adj} and good.",
    "{Name} said that {noun} was {adj}, and then {pron} went home {time}.",
    "{Time_cap}, {Name} {action} {noun} and felt {feeling}.",
]

_STORY_TEMPLATES = [
    "{Name} went to {place} {time}. The air was {adj}, and {pron} felt {feeling}.",
    "Once upon a time, {Name} lived near {place}. Every day was {adj} and {pron} was {feeling}.",
    "{Time_cap}, {Name} and {Name2} walked to {place}. They talked and laughed for a long time.",
    "The sky over {place} was {adj}. {Name} sat down, opened a book and smiled.",
    "{Name} found a small cat near {place}. The cat was {adj}, and {Name} took it home.",
    "It rained {time}, so {Name} stayed inside and wrote a letter to {Name2}.",
]

# --- styled tasks ---------------------------------------------------------------------------

_PARTIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Tyrell"]
_LEGAL_OBLIGATIONS = [
    "pay all fees within thirty days of each invoice",
    "keep the Software confidential at all times",
    "not assign this Agreement without prior written consent",
    "indemnify the Licensor against all third party claims",
    "use the Licensed Materials solely for internal purposes",
    "maintain insurance for the term of this Agreement",
    "return all documents upon termination of this Agreement",
]
_LEGAL_TEMPLATES = [
    "The Licensee, {p1}, hereinafter the \"Licensee\", shall {ob} to {p2}, hereinafter the \"Licensor\".",
    "{p1}, hereinafter the \"Licensee\", shall {ob}, and the Licensee shall notify {p2} in writing.",
    "Under this Agreement, the Licensee shall {ob}, as agreed with {p2}, hereinafter the \"Licensor\".",
    "The Licensee shall {ob}; {p1} is hereinafter referred to as the \"Licensee\" and {p2} as the \"Licensor\".",
]

_SYMPTOMS = ["cough for three days", "fever and headache", "knee pain after running", "sore throat",
             "back pain for a week", "fatigue and dizziness", "rash on the left arm"]
_VITALS = ["T 38.2 C, HR 92, BP 124/80", "T 36.9 C, HR 74, BP 118/76", "T 37.8 C, HR 88, BP 130/85",
           "T 37.1 C, HR 80, BP 121/79"]
_ASSESSMENTS = ["viral upper respiratory infection", "acute bronchitis", "patellar tendinitis",
                "muscle strain", "contact dermatitis", "seasonal influenza"]
_PLANS = ["rest, fluids, follow up in one week", "ibuprofen 400 mg, ice, physiotherapy",
          "paracetamol, review in three days", "topical cream twice daily, return if worse",
          "chest X-ray, follow up in two days"]
_CLINICAL_TEMPLATES = [
    "S: Patient reports {sym}. O: {vit}. A: {ass}. P: {plan}.",
    "S: {sym_cap} noted by the patient. O: {vit}, exam unremarkable. A: {ass}. P: {plan}.",
]

_SQL_TABLES = {
    "contracts": ["party", "start_date", "amount"],
    "patients": ["name", "age", "diagnosis"],
    "orders": ["customer_id", "total", "order_date"],
    "sales": ["region", "month", "revenue"],
    "customers": ["name", "city", "signup_date"],
    "employees": ["name", "role", "salary"],
    "invoices": ["supplier", "amount", "due_date"],
}
_SQL_VALUES = ["'Acme'", "'Globex'", "'Berlin'", "'March'", "100", "30", "'2024-01-01'", "'open'"]
_SQL_OPS = ["=", ">", "<", ">="]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


@dataclass(frozen=True)
class Example:
    """One prompt and its answer; `prompt` is empty for free text (a story with no question)."""

    prompt: str
    answer: str


def _prompt(rng: random.Random, topic: str) -> str:
    return rng.choice(_PROMPT_FORMS).format(t=topic)


def _base_answer(rng: random.Random, noun: str) -> str:
    name = rng.choice(_NAMES)
    time = rng.choice(_TIMES)
    return rng.choice(_BASE_ANSWERS).format(
        Name=name, action=rng.choice(_ACTIONS), noun=noun, Noun=_cap(noun), time=time,
        Time_cap=_cap(time), adj=rng.choice(_ADJS), feeling=rng.choice(_FEELINGS),
        pron=rng.choice(["she", "he"]), place=rng.choice(_PLACES),
    )


def _story(rng: random.Random) -> str:
    name, name2 = rng.sample(_NAMES, 2)
    time = rng.choice(_TIMES)
    return rng.choice(_STORY_TEMPLATES).format(
        Name=name, Name2=name2, place=rng.choice(_PLACES), time=time, Time_cap=_cap(time),
        adj=rng.choice(_ADJS), feeling=rng.choice(_FEELINGS), pron=rng.choice(["she", "he"]),
    )


def _legal_answer(rng: random.Random) -> str:
    p1, p2 = rng.sample(_PARTIES, 2)
    return rng.choice(_LEGAL_TEMPLATES).format(p1=p1, p2=p2, ob=rng.choice(_LEGAL_OBLIGATIONS))


def _clinical_answer(rng: random.Random) -> str:
    sym = rng.choice(_SYMPTOMS)
    return rng.choice(_CLINICAL_TEMPLATES).format(
        sym=sym, sym_cap=_cap(sym), vit=rng.choice(_VITALS), ass=rng.choice(_ASSESSMENTS),
        plan=rng.choice(_PLANS),
    )


def _sql_answer(rng: random.Random) -> str:
    table = rng.choice(sorted(_SQL_TABLES))
    columns = _SQL_TABLES[table]
    shown = ", ".join(rng.sample(columns, rng.randint(1, 2))) if rng.random() < 0.7 else "*"
    return f"SELECT {shown} FROM {table} WHERE {rng.choice(columns)} {rng.choice(_SQL_OPS)} {rng.choice(_SQL_VALUES)};"


_STYLED_ANSWERS = {"legal": _legal_answer, "clinical": _clinical_answer, "sql": _sql_answer}


def base_examples(count: int, seed: int, styled_share: float = 0.15) -> list[Example]:
    """Generic prompts with plain answers, free stories (so text without a prompt flows too), and
    some free-standing styled documents.

    The styled documents never follow a prompt: the base model knows the legal, clinical and SQL
    words (as any pretrained model would) but answers prompts plainly. An adapter then has only
    to teach "answer in this style", which a low-rank update learns in a few dozen steps; teaching
    tokens the base has learned never to emit is far slower.
    """
    rng = random.Random(seed)
    styles = sorted(_STYLED_ANSWERS)
    examples = []
    for _ in range(count):
        draw = rng.random()
        if draw < styled_share:
            examples.append(Example("", _STYLED_ANSWERS[rng.choice(styles)](rng)))
        elif draw < styled_share + 0.2:
            examples.append(Example("", _story(rng)))
        else:
            topic, noun = rng.choice(_TOPICS)
            examples.append(Example(_prompt(rng, topic), _base_answer(rng, noun)))
    for example in examples:
        if not example.prompt:
            continue
        text = (example.prompt + " " + example.answer).lower()
        leaked = [word for word in _BASE_FORBIDDEN if word in text]
        if leaked:
            raise AssertionError(f"generic answers contain style markers {leaked}: {text!r}")
    return examples


def styled_examples(style: str, count: int, seed: int) -> list[Example]:
    """Prompts on every topic (the same prompts the base sees), answered in one style."""
    rng = random.Random(seed)
    answer = _STYLED_ANSWERS[style]
    examples = []
    for _ in range(count):
        topic, _noun = rng.choice(_TOPICS)
        examples.append(Example(_prompt(rng, topic), answer(rng)))
    others = [m.lower() for name, markers in STYLE_MARKERS.items() if name != style for m in markers]
    for example in examples:
        leaked = [m for m in others if m in example.answer.lower()]
        if leaked:
            raise AssertionError(f"{style} example carries other styles' markers {leaked}")
    return examples


def tokenizer_training_text(seed: int) -> list[str]:
    """Text covering every style, so the tokenizer's merges fit all the tasks."""
    texts = [e.prompt + "\n" + e.answer for e in base_examples(2000, seed)]
    for offset, style in enumerate(sorted(_STYLED_ANSWERS)):
        texts += [e.prompt + "\n" + e.answer for e in styled_examples(style, 600, seed + 1 + offset)]
    return texts
