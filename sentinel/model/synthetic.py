"""The default corpus, generated: deterministic, offline, and with structure a small model can learn.

A fresh machine needs training data with no download, and a demo needs a loss that visibly falls.
Random bytes would not fall; a repeated paragraph would be memorised at once. This generator mixes:

- English-like prose from a small probabilistic grammar: determiners that agree with their noun
  ("a"/"an"/"these"), subject-verb agreement in the present tense, also across a relative clause
  ("the dogs that see the fox run"), do/does questions, past tense, prepositional phrases;
- facts about a fixed cast of named people (each always lives in the same city and has the same job),
  as sentences and as "key: value" records, so there is something to memorise;
- arithmetic lines with correct results ("17 + 25 = 42").

Randomness comes from a SplitMix64 defined here rather than Python's `random`, so the text -- and the
corpus fingerprint pinned in a run manifest -- cannot change with the interpreter version. The output is
pure ASCII, so a byte is a character and truncation never splits one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")
_MASK = (1 << 64) - 1


class _Rng:
    """SplitMix64 (Steele et al. 2014): a few lines, well mixed, identical everywhere."""

    def __init__(self, seed: int) -> None:
        self.state = (seed * 0x9E3779B97F4A7C15 + 0x2545F4914F6CDD1D) & _MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def pick(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]

    def chance(self, p: float) -> bool:
        return self.next() < int(p * (1 << 64))


# (singular, plural) animate nouns: they can be subjects of any verb.
AGENTS = [("cat", "cats"), ("dog", "dogs"), ("child", "children"), ("teacher", "teachers"),
          ("farmer", "farmers"), ("bird", "birds"), ("robot", "robots"), ("king", "kings"),
          ("queen", "queens"), ("sailor", "sailors"), ("fox", "foxes"), ("mouse", "mice"),
          ("wolf", "wolves"), ("baker", "bakers"), ("student", "students"), ("owl", "owls")]
# (singular, plural) things: objects only.
THINGS = [("apple", "apples"), ("book", "books"), ("letter", "letters"), ("song", "songs"),
          ("bridge", "bridges"), ("lamp", "lamps"), ("map", "maps"), ("box", "boxes"), ("key", "keys"),
          ("ship", "ships"), ("stone", "stones"), ("cake", "cakes"), ("story", "stories"),
          ("clock", "clocks"), ("window", "windows"), ("egg", "eggs"), ("umbrella", "umbrellas")]
ADJECTIVES = ["small", "old", "red", "quiet", "happy", "clever", "tall", "young", "brave", "green",
              "bright", "heavy", "tired", "gentle", "strange", "empty", "ancient"]
# (base, third person singular, past)
TRANSITIVE = [("see", "sees", "saw"), ("find", "finds", "found"), ("carry", "carries", "carried"),
              ("read", "reads", "read"), ("build", "builds", "built"), ("watch", "watches", "watched"),
              ("open", "opens", "opened"), ("paint", "paints", "painted"), ("want", "wants", "wanted"),
              ("like", "likes", "liked"), ("follow", "follows", "followed"), ("draw", "draws", "drew")]
INTRANSITIVE = [("sleep", "sleeps", "slept"), ("sing", "sings", "sang"), ("run", "runs", "ran"),
                ("wait", "waits", "waited"), ("laugh", "laughs", "laughed"), ("dance", "dances", "danced"),
                ("rest", "rests", "rested"), ("swim", "swims", "swam")]
ADVERBS = ["quickly", "slowly", "quietly", "happily", "again", "today", "often", "at night"]
PLACES = ["in the garden", "near the river", "under the bridge", "behind the house", "at the market",
          "on the hill", "by the sea", "in the old library"]
DET_SINGULAR = ["the", "a", "this", "that", "every", "one"]
DET_PLURAL = ["the", "some", "many", "these", "those", "two", "three"]
# The recurring cast: name -> (city, job, age). Always the same, so these are learnable facts.
PEOPLE = {"Ada Moreau": ("Lisbon", "engineer", 34), "Tomas Reyes": ("Oslo", "baker", 51),
          "Mira Chen": ("Cairo", "pilot", 29), "Jonas Weber": ("Lima", "teacher", 46),
          "Lena Novak": ("Kyoto", "doctor", 38), "Omar Haddad": ("Quito", "farmer", 62),
          "Sofia Rossi": ("Dakar", "sailor", 27), "Ravi Kumar": ("Tallinn", "painter", 44)}
NAMES = sorted(PEOPLE)


def _article(det: str, next_word: str) -> str:
    return "an" if det == "a" and next_word[0] in "aeiou" else det


class _Grammar:
    def __init__(self, rng: _Rng) -> None:
        self.rng = rng

    def noun_phrase(self, nouns: list[tuple[str, str]], plural: bool) -> str:
        r = self.rng
        noun = r.pick(nouns)[1 if plural else 0]
        words = [r.pick(ADJECTIVES) for _ in range(r.pick((0, 0, 1, 1, 2)))]
        if len(words) == 2 and words[0] == words[1]:
            words.pop()
        words.append(noun)
        det = r.pick(DET_PLURAL if plural else DET_SINGULAR)
        return " ".join([_article(det, words[0]), *words])

    def verb_phrase(self, plural: bool, tense: str) -> str:
        """Verb agreeing with a subject of the given number, plus object and modifiers."""
        r = self.rng
        transitive = r.chance(0.6)
        base, third, past = r.pick(TRANSITIVE if transitive else INTRANSITIVE)
        verb = past if tense == "past" else (base if plural else third)
        parts = [verb]
        if transitive:
            parts.append(self.noun_phrase(THINGS + AGENTS, r.chance(0.3)))
        if r.chance(0.3):
            parts.append(r.pick(PLACES))
        if r.chance(0.2):
            parts.append(r.pick(ADVERBS))
        return " ".join(parts)

    def subject(self) -> tuple[str, bool]:
        r = self.rng
        if r.chance(0.15):
            return r.pick(NAMES), False
        plural = r.chance(0.4)
        np = self.noun_phrase(AGENTS, plural)
        if r.chance(0.15):  # relative clause: its verb agrees with the same head noun
            np += " that " + self.verb_phrase(plural, "present")
        return np, plural

    def clause(self, tense: str) -> str:
        subj, plural = self.subject()
        return f"{subj} {self.verb_phrase(plural, tense)}"

    def sentence(self) -> str:
        r = self.rng
        tense = "past" if r.chance(0.3) else "present"
        if r.chance(0.1):  # question: do/does agrees, the verb stays in its base form
            subj, plural = self.subject()
            base, _, _ = r.pick(TRANSITIVE)
            obj = self.noun_phrase(THINGS, r.chance(0.3))
            aux = "Did" if tense == "past" else ("Do" if plural else "Does")
            return f"{aux} {subj} {base} {obj}?"
        text = self.clause(tense)
        if r.chance(0.2):
            text += f"{r.pick((',', ''))} {r.pick(('and', 'because', 'but', 'while'))} {self.clause(tense)}"
        return text[0].upper() + text[1:] + "."

    def paragraph(self) -> str:
        return " ".join(self.sentence() for _ in range(3 + self.rng.below(4)))

    def facts(self) -> str:
        r = self.rng
        lines = []
        for _ in range(2 + r.below(3)):
            name = r.pick(NAMES)
            city, job, age = PEOPLE[name]
            lines.append(r.pick((f"{name} lives in {city}.", f"{name} works as {_article('a', job)} {job}.",
                                 f"{name} is {age} years old.", f"In {city}, {name} {self.verb_phrase(False, 'past')}.")))
        return " ".join(lines)

    def record(self) -> str:
        r = self.rng
        name = r.pick(NAMES)
        city, job, age = PEOPLE[name]
        return "\n".join([f"name: {name}", f"city: {city}", f"job: {job}", f"age: {age}",
                          f"visits: {r.below(20)}"])

    def arithmetic(self) -> str:
        r = self.rng
        lines = []
        for _ in range(3 + r.below(4)):
            op = r.pick("++-*")
            if op == "*":
                a, b = 2 + r.below(11), 2 + r.below(11)
                lines.append(f"{a} * {b} = {a * b}")
            else:
                a, b = r.below(100), r.below(100)
                if op == "-" and b > a:
                    a, b = b, a
                lines.append(f"{a} {op} {b} = {a + b if op == '+' else a - b}")
        return "\n".join(lines)


def generate_corpus(num_bytes: int = 400_000, seed: int = 0) -> str:
    """Exactly `num_bytes` ASCII characters of mixed prose, facts, records and arithmetic, separated by
    blank lines; the same (num_bytes, seed) always gives the same text."""
    if num_bytes < 1:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}")
    grammar = _Grammar(_Rng(seed))
    kinds = [grammar.paragraph] * 13 + [grammar.facts] * 2 + [grammar.record] * 2 + [grammar.arithmetic] * 3
    chunks: list[str] = []
    size = 0
    while size < num_bytes:
        chunk = grammar.rng.pick(kinds)() + "\n\n"
        chunks.append(chunk)
        size += len(chunk)
    return "".join(chunks)[:num_bytes]
