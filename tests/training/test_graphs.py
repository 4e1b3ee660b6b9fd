"""Training in CUDA graphs: torch.compile(mode="reduce-overhead") of a SigmaModel, in a plain loop and through
the HF Trainer's torch_compile_mode, gives the losses of eager training step for step (README: "Training in a
CUDA graph"). The fused kernel (rank ≤ 128) and the GEMM path (the full spectrum) both run inside the graphs.
CUDA only: CUDA graphs need a GPU."""

from __future__ import annotations

import pytest
import torch

from sigmatune import SigmaConfig, get_sigma_model
from tests.models import tiny_llama, token_batch
from tests.training.test_trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
STEPS = 5


def losses(model, runner, graphed: bool) -> list[float]:
    """STEPS steps of AdamW on one batch; the loss of each."""
    ids = token_batch().cuda()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen = []
    for _ in range(STEPS):
        if graphed:  # a new iteration: the last one's graph outputs are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        loss = runner(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen.append(loss.item())
    return seen


@pytest.mark.parametrize("rank", [4, "full"])  # the fused kernel; the GEMM path
def test_five_graphed_steps_give_the_eager_losses(rank):
    base = tiny_llama().cuda()
    config = SigmaConfig(rank=rank, init="normal", init_std=0.05)
    torch.manual_seed(0)  # the same initial vectors in both runs
    eager_model = get_sigma_model(base, config, progress=False)
    eager = losses(eager_model, eager_model, graphed=False)
    eager_model.unload()
    torch.manual_seed(0)
    graphed_model = get_sigma_model(base, config, progress=False)
    graphed = losses(graphed_model, torch.compile(graphed_model, mode="reduce-overhead"), graphed=True)
    assert eager[-1] < eager[0]  # it trains
    assert graphed == pytest.approx(eager, rel=2e-4)


def test_the_trainers_torch_compile_mode_trains_in_graphs_as_eager_does(tmp_path):
    runs = {}
    for mode in (None, "reduce-overhead"):
        torch.manual_seed(0)
        model = get_sigma_model(tiny_llama().cuda(), SigmaConfig(rank=4), progress=False)
        options = dict(torch_compile=True, torch_compile_mode=mode) if mode else {}
        _, runs[mode] = train(model, tmp_path / str(mode), steps=12, use_cpu=False, **options)
    assert runs[None][-1] < runs[None][0]
    assert runs["reduce-overhead"] == pytest.approx(runs[None], rel=1e-3)
