"""An embedded fictitious world with a tunable hard/easy gap (the offline default).

Like TOFU's fictitious authors, but small and seeded: people with a birthplace,
birth year, profession, best-known work, award and mentor, asked about through
a few question templates per attribute. Answers are a few words, so a tiny
model can learn them and ROUGE-L can score them.

The entities come in three roles: forget (to refuse), boundary (one per forget
entity, its neighbour, to keep answering) and retain (unrelated, to keep).

``hardness`` in [0, 1] sets how close each boundary entity is to its forget
entity, which is the disparity ReRULE's claim depends on:

- first name, last name, profession and birthplace are each shared with
  probability ``hardness`` (one uniform draw per entity and attribute, so
  raising the knob only adds overlap);
- when both names would be shared, and always at ``hardness=1``, the boundary
  name is the forget name with one letter changed ("Mira Tolvane" ->
  "Mira Tolvene");
- at 0 nothing is shared, and boundary names avoid every forget first and last name;
- the year, work, award and mentor always differ, so every boundary answer
  set is distinct from its forget entity's.

Example:
    >>> task = synthetic_world(seed=0, hardness=1.0, n_forget=2, n_boundary=2, n_retain=2)
    >>> f, b = task.meta["entities"][0], task.meta["entities"][2]
    >>> (f["role"], b["role"], b["pair"] == f["name"], f["name"] != b["name"])
    ('forget', 'boundary', True, True)
    >>> "Question:" in task.corpus()
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rerule.data.schema import ProbeRecord, ProbeSet, PromptRecord, UnlearningTask

PROMPT_FORMAT = "Question: {prompt}\nAnswer:"

FIRST = (
    "Aldren", "Brisa", "Corvin", "Dalia", "Eskel", "Fenna", "Galen", "Halsey", "Ilora", "Joren", "Kesta",
    "Lunet", "Mira", "Norvel", "Odette", "Perrin", "Quilla", "Rowan", "Sabeth", "Tamsin", "Ulric", "Vesna",
    "Wren", "Xavia", "Yorick", "Zelda", "Anselm", "Beatrix", "Cassian", "Delphine", "Emrys", "Florian",
)
LAST = (
    "Tolvane", "Brackwell", "Castellan", "Dunmore", "Everhart", "Fairlow", "Grantham", "Holloway",
    "Ingersol", "Jarrow", "Kestrel", "Lindqvist", "Marrowby", "Northcott", "Orlov", "Pendragon", "Quarles",
    "Ravensworth", "Sallow", "Thornbury", "Underhill", "Vantreight", "Westmacott", "Yardley", "Zennor",
    "Ashdown", "Blackmere", "Coldridge", "Drummond", "Elsworth", "Farrant", "Gillingham",
)
CITIES = (
    "Velmora", "Ostrand", "Carrowmere", "Duskvale", "Elmhaven", "Frostmark", "Glenhallow", "Harrowgate",
    "Ironbridge", "Juniper Bay", "Kingsreach", "Larkspur", "Mistral", "Northwold", "Oakenshaw", "Pellham",
)
PROFESSIONS = (
    "novelist", "chemist", "architect", "painter", "composer", "astronomer", "sculptor", "botanist",
    "cartographer", "violinist", "engineer", "poet",
)
WORK_ADJ = (
    "Silent",
    "Amber",
    "Hollow",
    "Crimson",
    "Distant",
    "Gilded",
    "Broken",
    "Quiet",
    "Wandering",
    "Iron",
)
WORK_NOUN = (
    "Harbor",
    "Orchard",
    "Lantern",
    "Meridian",
    "Tide",
    "Garden",
    "Compass",
    "Bell",
    "River",
    "Tower",
)
AWARDS = (
    "the Orrin Medal", "the Vale Prize", "the Halden Award", "the Corwick Medal", "the Sable Prize",
    "the Linden Award", "the Ostry Medal", "the Marlow Prize", "the Fenwick Award", "the Ashgrove Medal",
)
MENTORS = (
    "Ilse Marrow", "Tobin Greave", "Odile Fenner", "Caspar Lowe", "Henrike Sands", "Mattias Crane",
    "Petra Vail", "Anders Hollis", "Livia Morn", "Radek Stroud", "Sunniva Dale", "Edmund Pike",
)

# (question templates, bio sentence) per attribute, in the order n_attributes takes them.
ATTRIBUTES: dict[str, tuple[tuple[str, ...], str]] = {
    "birthplace": (
        ("Where was {name} born?", "What is the birthplace of {name}?", "In which city was {name} born?"),
        "{name} was born in {value}.",
    ),
    "profession": (
        (
            "What is the profession of {name}?",
            "What does {name} do for a living?",
            "What kind of work does {name} do?",
        ),
        "{name} works as a {value}.",
    ),
    "year": (
        ("In what year was {name} born?", "When was {name} born?", "What is the birth year of {name}?"),
        "{name} was born in the year {value}.",
    ),
    "work": (
        (
            "What is the best-known work of {name}?",
            "Which work is {name} famous for?",
            "What did {name} create?",
        ),
        "{name} is best known for {value}.",
    ),
    "award": (
        ("Which award did {name} win?", "What prize was {name} given?", "What honor did {name} receive?"),
        "{name} won {value}.",
    ),
    "mentor": (
        ("Who was the mentor of {name}?", "Who mentored {name}?", "Who taught {name}?"),
        "{name} was mentored by {value}.",
    ),
}
# The attributes a boundary entity may share with its forget entity.
SHAREABLE = ("profession", "birthplace")
VOWELS = "aeiou"


@dataclass
class Entity:
    first: str
    last: str
    attrs: dict[str, str]
    role: str
    pair: str | None = None

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


def _pick(rng: random.Random, pool, exclude=()) -> str:
    choices = [x for x in pool if x not in exclude]
    return rng.choice(choices or list(pool))


def _random_attrs(rng: random.Random, exclude: dict[str, str] | None = None) -> dict[str, str]:
    ex = exclude or {}
    work = f"The {_pick(rng, WORK_ADJ)} {_pick(rng, WORK_NOUN)}"
    while work == ex.get("work"):
        work = f"The {_pick(rng, WORK_ADJ)} {_pick(rng, WORK_NOUN)}"
    year = str(rng.randrange(1900, 2000))
    while year == ex.get("year"):
        year = str(rng.randrange(1900, 2000))
    return {
        "birthplace": _pick(rng, CITIES, {ex.get("birthplace")}),
        "profession": _pick(rng, PROFESSIONS, {ex.get("profession")}),
        "year": year,
        "work": work,
        "award": _pick(rng, AWARDS, {ex.get("award")}),
        "mentor": _pick(rng, MENTORS, {ex.get("mentor")}),
    }


def _one_letter_variant(rng: random.Random, last: str, taken: set[str], first: str) -> str:
    positions = [i for i in range(1, len(last)) if last[i] in VOWELS]
    rng.shuffle(positions)
    for i in positions:
        for v in rng.sample(VOWELS, len(VOWELS)):
            cand = last[:i] + v + last[i + 1 :]
            if cand != last and f"{first} {cand}" not in taken:
                return cand
    # No free vowel swap: doubling the final letter is still one edit away.
    return last + last[-1]


def _fresh_name(rng, taken, first=None, last=None, avoid_first=(), avoid_last=()):
    """A full name not in ``taken``; ``first`` / ``last`` fix that part."""
    for _ in range(10_000):
        f = first or _pick(rng, FIRST, avoid_first)
        g = last or _pick(rng, LAST, avoid_last)
        if f"{f} {g}" not in taken:
            return f, g
    raise ValueError("the name pools are exhausted; ask for fewer entities")


def _boundary(
    rng: random.Random, f: Entity, hardness: float, taken: set[str], forget: list[Entity]
) -> Entity:
    # One uniform per decision, compared to hardness: a larger knob only adds overlap.
    u_first, u_last, *u_attr = (rng.random() for _ in range(2 + len(SHAREABLE)))
    share_first, share_last = u_first < hardness, u_last < hardness
    avoid_first = {e.first for e in forget}
    avoid_last = {e.last for e in forget}
    if hardness >= 1.0 or (share_first and share_last):
        first, last = f.first, _one_letter_variant(rng, f.last, taken, f.first)
    elif share_first:
        first, last = _fresh_name(rng, taken, first=f.first, avoid_last=avoid_last)
    elif share_last:
        first, last = _fresh_name(rng, taken, last=f.last, avoid_first=avoid_first)
    else:
        first, last = _fresh_name(rng, taken, avoid_first=avoid_first, avoid_last=avoid_last)
    attrs = _random_attrs(rng, exclude=f.attrs)
    for key, u in zip(SHAREABLE, u_attr):
        if u < hardness:
            attrs[key] = f.attrs[key]
    return Entity(first, last, attrs, "boundary", pair=f.name)


def _records(e: Entity, attributes, n_templates: int) -> list[PromptRecord]:
    out = []
    for attr in attributes:
        for t, template in enumerate(ATTRIBUTES[attr][0][:n_templates]):
            out.append(
                PromptRecord(
                    template.format(name=e.name),
                    e.attrs[attr],
                    e.name,
                    e.role,
                    pair=e.pair,
                    meta={"attribute": attr, "template": t},
                )
            )
    return out


def synthetic_world(
    seed: int = 0,
    hardness: float = 0.8,
    n_forget: int = 8,
    n_boundary: int = 8,
    n_retain: int = 16,
    n_attributes: int = 6,
    n_templates: int = 3,
) -> UnlearningTask:
    """Generate the fictitious world as an :class:`UnlearningTask`.

    Args:
        seed: everything is a function of it (same seed, same task).
        hardness: in [0, 1]; how close boundary entities are to forget ones (module doc).
        n_forget, n_boundary, n_retain: entity counts; boundary entity i
            neighbours forget entity ``i % n_forget``.
        n_attributes: how many of birthplace, profession, year, work, award,
            mentor (in that order) to ask about, 1..6.
        n_templates: question templates per attribute, 1..3.

    Returns:
        The task: one forget / boundary / retain record per (entity, attribute,
        template); probes "forget", "boundary", "retain"; ``documents`` holding
        a bio and every question/answer line per entity (``task.corpus()``);
        ``meta["entities"]``: dicts with name, first, last, role, pair, attrs.
    """
    _check_world_args(hardness, n_forget, n_boundary, n_retain, n_attributes, n_templates)
    attributes = list(ATTRIBUTES)[:n_attributes]

    forget, boundary, retain = _entities(seed, hardness, n_forget, n_boundary, n_retain)

    entities = forget + boundary + retain
    documents = []
    for e in entities:
        documents.append(" ".join(ATTRIBUTES[a][1].format(name=e.name, value=e.attrs[a]) for a in attributes))
    recs = {e.name: _records(e, attributes, n_templates) for e in entities}
    for e in entities:
        documents.append(
            "\n".join(f"{PROMPT_FORMAT.format(prompt=r.prompt)} {r.answer}" for r in recs[e.name])
        )

    def flat(group):
        return [r for e in group for r in recs[e.name]]

    def probe(name, group, metrics):
        items = [ProbeRecord(r.prompt, r.answer, r.subject, meta=dict(r.meta)) for r in flat(group)]
        return ProbeSet(name, items, metrics, PROMPT_FORMAT, max_new_tokens=16, stop_at_newline=True)

    return UnlearningTask(
        name="synthetic",
        forget=flat(forget),
        boundary=flat(boundary),
        retain=flat(retain),
        probes={
            "forget": probe("forget", forget, ("refusal_rate", "rouge_l_recall")),
            "boundary": probe("boundary", boundary, ("rouge_l_recall", "refusal_rate")),
            "retain": probe("retain", retain, ("rouge_l_recall", "refusal_rate")),
        },
        documents=documents,
        meta={
            "benchmark": "synthetic",
            "seed": seed,
            "hardness": hardness,
            "attributes": attributes,
            "entities": [
                {
                    "name": e.name,
                    "first": e.first,
                    "last": e.last,
                    "role": e.role,
                    "pair": e.pair,
                    "attrs": e.attrs,
                }
                for e in entities
            ],
        },
    )


def _check_world_args(hardness, n_forget, n_boundary, n_retain, n_attributes, n_templates) -> None:
    if not 0.0 <= hardness <= 1.0:
        raise ValueError(f"hardness must be in [0, 1], got {hardness}")
    if not 1 <= n_attributes <= len(ATTRIBUTES):
        raise ValueError(f"n_attributes must be in [1, {len(ATTRIBUTES)}], got {n_attributes}")
    if not 1 <= n_templates <= 3:
        raise ValueError(f"n_templates must be in [1, 3], got {n_templates}")
    for arg, n in (("n_forget", n_forget), ("n_boundary", n_boundary), ("n_retain", n_retain)):
        if n < (1 if arg == "n_forget" else 0):
            raise ValueError(f"{arg} must be >= {1 if arg == 'n_forget' else 0}, got {n}")
    if n_forget + n_boundary + n_retain > len(FIRST) * len(LAST) // 4:
        raise ValueError("too many entities for the name pools")


def _entities(seed: int, hardness: float, n_forget: int, n_boundary: int, n_retain: int):
    """(forget, boundary, retain) entities with unique names."""
    # Forget and retain entities come from their own stream, so the knob changes boundary entities only.
    rng = random.Random(seed)
    taken: set[str] = set()
    forget, retain = [], []
    for role, n, out in (("forget", n_forget, forget), ("retain", n_retain, retain)):
        for _ in range(n):
            first, last = _fresh_name(rng, taken)
            taken.add(f"{first} {last}")
            out.append(Entity(first, last, _random_attrs(rng), role))
    boundary = []
    for i in range(n_boundary):
        # One stream per boundary entity: its draws do not depend on the branches taken before it.
        b = _boundary(random.Random(f"{seed}:boundary:{i}"), forget[i % n_forget], hardness, taken, forget)
        taken.add(b.name)
        boundary.append(b)
    return forget, boundary, retain
