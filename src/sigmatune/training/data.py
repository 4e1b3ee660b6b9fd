"""Training data, offline: the default task ships with sigmatune, the others come from a package registry
or the user.

- BIG-bench tasks (Apache-2.0): the default, qa_wikidata, shipped in bundled/ (BIG-bench's file, checked
  by its sha256); any other read straight from the `bigbench` sdist on PyPI (hub/registry.py downloads
  it once into the cache folder and checks its sha256; nothing is installed).
- The user's own JSONL / JSON / CSV / text file.

Held-out examples are chosen by a seeded shuffle. The default model comes from hub/ (loading).
"""

from __future__ import annotations

import csv
import difflib
import gzip
import hashlib
import json
import random
import re
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..core.config import cache_root
from ..formats.files import atomic_write_json, read_json
from ..hub.registry import download_path, registry_file

BIGBENCH_SDIST = (  # (project, file, sha256) on the package registry
    "bigbench",
    "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
)
# tasks shipped in bundled/ (its README: source, license): name → sha256 of the task.json they hold
BUNDLED_TASKS = {"qa_wikidata": "6340744cf2fb958564b70a071fd01624327c067f4335939e1db2fa3a353cc802"}
BUNDLED = Path(__file__).parent / "bundled"
PROMPT_KEYS = ("prompt", "input", "question", "instruction")
ANSWER_KEYS = ("answer", "target", "output", "completion", "response", "answers")
INSTRUCTIONS = {  # system messages for BIG-bench tasks whose inputs are bare prompts
    "qa_wikidata": "Complete the statement with the missing fact. Reply with the answer only.",
}


@dataclass
class Example:
    """One training or evaluation example."""

    prompt: str | None  # the user's message; None = plain text, trained on as a whole
    answers: list[str]  # acceptable answers; answers[0] is the one training teaches
    group: str | None = None  # examples of one group (a document, a speaker, an entity) stay on one side
    # of every split: the held-out one (load_task) and lr auto's slice (lr_auto.slice_split)
    draws_on: tuple[str, ...] = ()  # groups it shows without belonging to them (an exemplar, a quoted
    # document): never trained on while one of them is held out (it would show the held-out answers)


@dataclass
class Task:
    """A named set of examples with a seeded held-out split."""

    name: str
    instruction: str | None  # system message put before every prompt (None: none)
    train: list[Example]
    heldout: list[Example]
    source: str  # where the data came from, and its license

    def described(self) -> str:
        """What a job says of the task it loaded."""
        return f"{len(self.train)} train / {len(self.heldout)} held-out examples from {self.source}"

    def record(self) -> dict:
        """The task as training_summary.json records it."""
        return dict(name=self.name, source=self.source, instruction=self.instruction, train=len(self.train),
                    heldout=len(self.heldout))  # fmt: skip


def load_task(spec: str, heldout: int = 200, seed: int = 0) -> Task:
    """A task by spec: "bigbench:<task>[/<subtask>]", or a path to a .jsonl/.json/.csv/.txt file."""
    if spec.startswith("bigbench:"):
        name = spec.removeprefix("bigbench:")
        data = bigbench_task(name)
        examples = [_bigbench_example(record) for record in data["examples"]]
        instruction = INSTRUCTIONS.get(name) or (
            data.get("description", "").strip() + " Reply with the answer only."
        )
        where = "shipped with sigmatune" if name in BUNDLED_TASKS else "on PyPI"
        source = f"BIG-bench task {name} ({BIGBENCH_SDIST[1]}, {where}; Apache-2.0)"
    else:
        path = Path(spec).expanduser()
        examples, instruction, source = _read_user_file(path), None, f"{path} (your file)"
        name = path.stem
    if len(examples) < 2:
        raise ValueError(
            f"{spec}: needs at least 2 examples (one to train on, one held out), found {len(examples)}"
        )
    count = max(1, min(heldout, len(examples) // 5))  # at most a fifth of a small file is held out
    if count < heldout:
        capped = f"{count} held out: at most a fifth of the {len(examples)} examples of {spec} are held out"
        print(f"warning: --heldout {heldout} asked for, {capped}", file=sys.stderr, flush=True)
    train, held = held_out_split(examples, count, seed)
    if not train:
        raise ValueError(
            f"{spec}: holding out whole groups left nothing to train on (a group of {len(held)} examples?); "
            "give the examples more, smaller groups, or none"
        )
    return Task(name=name, instruction=instruction, train=train, heldout=held, source=source)


def held_out_split(examples: list[Example], count: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): the first `count` examples of a seeded shuffle are held out, groups kept whole
    (split_off); both sides in the shuffle's order."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rest, held = split_off(examples, count, order)
    return [examples[i] for i in rest], [examples[i] for i in held]


def split_off(examples: list, count: int, order: list[int]) -> tuple[list[int], list[int]]:
    """(the rest, the split-off part) as indices in `order`'s order: the first `count` of `order`, or, where
    examples name groups (their `group`), the groups of the first examples in `order`, whole, until there are
    `count` examples or just more — no group on both sides (an example without one is a group of its own),
    and an example that draws on a split-off group (its `draws_on`) on neither side."""
    if all(getattr(e, "group", None) is None and not getattr(e, "draws_on", ()) for e in examples):
        return order[count:], order[:count]
    keys = group_keys(examples)
    sizes = Counter(keys)
    taken, total = set(), 0
    for i in order:
        if total >= count:
            break
        if keys[i] not in taken:
            taken.add(keys[i])
            total += sizes[keys[i]]
    return [i for i in order if trainable(examples[i], keys[i], taken)], [
        i for i in order if keys[i] in taken
    ]


def group_keys(examples: list) -> list:
    """Each example's group: its `group`, or for one without, its index (a group of its own; an index never
    equals a group's name)."""
    return [i if getattr(e, "group", None) is None else e.group for i, e in enumerate(examples)]


def trainable(example, key, held: set) -> bool:
    """Whether an example of group `key` may be trained on while the groups `held` are held out: neither its
    group nor any it draws on is."""
    return key not in held and not held.intersection(getattr(example, "draws_on", ()))


def bigbench_task(name: str) -> dict:
    """A BIG-bench task's JSON: shipped with sigmatune (BUNDLED_TASKS), or read from the bigbench sdist
    (downloaded once) and cached. A name BIG-bench lacks is an error naming the tasks nearest to it."""
    if not TASK_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a BIG-bench task name (letters, digits, '_' and '-', a subtask after one '/'): "
            f"e.g. bigbench:qa_wikidata; the names are {TASK_NAMES}"
        )
    if name in BUNDLED_TASKS:
        return _bundled_task(name)
    cached = cache_root() / "data" / "bigbench" / f"{name.replace('/', '__')}.json"
    if cached.exists():
        return read_json(cached, max_bytes=2**30)  # our own copy of a task file: some are large
    data = _task_from_sdist(_bigbench_sdist(name), name)
    atomic_write_json(cached, data)
    return data


TASK_NAME = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)?")
TASK_NAMES = "the folders of bigbench/benchmark_tasks in https://github.com/google/BIG-bench"


def _bigbench_sdist(name: str) -> Path:
    """The bigbench sdist, where it can be had; else an error saying the task cannot be checked offline."""
    try:
        return registry_file(*BIGBENCH_SDIST)
    except RuntimeError as err:
        reason = str(err.__context__ or "its sha256 differs")[:120]
        raise ValueError(
            f"bigbench:{name} is not shipped with sigmatune (its BIG-bench task: {', '.join(BUNDLED_TASKS)}), and "
            f"the bigbench sdist that holds the others cannot be had ({reason}), so the name cannot be checked "
            f"offline. BIG-bench's task names are {TASK_NAMES}; to train on one, put {BIGBENCH_SDIST[1]} "
            f"(`pip download --no-deps --no-binary :all: bigbench==1.0.0`) at {download_path(BIGBENCH_SDIST[1])}, "
            "or give --data a file of your own"
        ) from None


def _task_from_sdist(sdist: Path, name: str) -> dict:
    """A task's JSON read from the sdist; the error for a name it lacks lists the nearest ones."""
    folder = f"{sdist.name.removesuffix('.tar.gz')}/bigbench/benchmark_tasks/"
    print(f"reading {name} from {sdist.name}", file=sys.stderr)
    names = []
    with tarfile.open(sdist) as archive:
        for member in archive:
            if member.name.startswith(folder) and member.name.endswith("/task.json"):
                if member.name == f"{folder}{name}/task.json":
                    return json.load(archive.extractfile(member))
                names.append(member.name[len(folder) : -len("/task.json")])
    near = difflib.get_close_matches(name, names, n=3)
    guess = f"; did you mean {' or '.join(near)}?" if near else ""
    raise ValueError(f"BIG-bench has no task {name!r}{guess} ({len(names)} in {sdist.name}: {TASK_NAMES})")


def _bundled_task(name: str) -> dict:
    """A task shipped in bundled/, checked against the sha256 of BIG-bench's own file."""
    raw = gzip.decompress((BUNDLED / f"{name}.json.gz").read_bytes())
    if hashlib.sha256(raw).hexdigest() != BUNDLED_TASKS[name]:
        raise RuntimeError(f"the shipped copy of BIG-bench's {name} is damaged; reinstall sigmatune")
    return json.loads(raw)


def _bigbench_example(record: dict) -> Example:
    prompt = record["input"]
    if "target_scores" in record and "target" not in record:  # multiple choice: list the options
        scores = record["target_scores"]
        prompt += "\nOptions: " + "; ".join(scores)
        return Example(prompt, [max(scores, key=scores.get)])
    target = record["target"]
    return Example(prompt, list(target) if isinstance(target, list) else [target])


def _read_user_file(path: Path) -> list[Example]:
    if not path.is_file():
        raise ValueError(
            f"{path}: no such data file (give a .jsonl, .json, .csv or .txt file, or bigbench:<task>)"
        )
    suffix = path.suffix.lower()
    if suffix == ".txt":
        chunks = [c.strip() for c in path.read_text(encoding="utf-8").split("\n\n")]
        return [Example(None, [c]) for c in chunks if c]  # (a text file names no groups)
    if suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        records = [_json_line(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    elif suffix == ".json":
        data = _json_line(path, 1, path.read_text(encoding="utf-8"))
        records = data.get("examples") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, or an object with an 'examples' list")
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            records = list(csv.DictReader(handle))
    else:
        raise ValueError(f"{path}: unknown data format {suffix!r}; use .jsonl, .json, .csv or .txt")
    return [_user_example(path, n, record) for n, record in enumerate(records, 1)]


def _json_line(path: Path, number: int, line: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None


def _user_example(path: Path, number: int, record) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"{path}: record {number} is a {type(record).__name__}, expected an object")
    group = None if record.get("group") is None else str(record["group"])
    drawn = record.get("draws_on")  # a group's name, or a list of them
    draws_on = () if drawn is None else tuple(map(str, drawn)) if isinstance(drawn, list) else (str(drawn),)
    if "text" in record and not any(k in record for k in ANSWER_KEYS):
        return Example(None, [str(record["text"])], group, draws_on)
    prompt = next((record[k] for k in PROMPT_KEYS if k in record), None)
    answer = next((record[k] for k in ANSWER_KEYS if k in record), None)
    if prompt is None or answer is None:
        raise ValueError(
            f"{path}: record {number} has keys {sorted(record)}; give a prompt (one of {list(PROMPT_KEYS)}) "
            f"and an answer (one of {list(ANSWER_KEYS)}), or a 'text' field"
        )
    answers = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
    return Example(str(prompt), answers, group, draws_on)
