"""The fast path against plain eager PyTorch: the fused LoRA op, compiled blocks, and the
FLOP count scripts/bench.py divides by (ops.py's pieces: tests/test_ops.py).

Correctness only; timings live in scripts/bench.py. Compiling costs ~10-20 s per graph on
a small CPU, so the compiled checks share one module-scoped compiled model.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from minift import GPT, GPTConfig
from minift.model import Block, compile_blocks
from minift.peft import LoraConfig, LoraLinear, get_peft_model
from minift.peft.lora import LoraLinearFunction, lora_linear
from minift.ops import keep_mask
from conftest import reference_keep


TINY = dict(n_layer=3, n_head=2, n_embd=32, vocab_size=97, n_positions=64,
            embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
# compile_blocks on the CPU draws dropout masks from torch's generator, as eager does, so
# compiled and eager steps with every dropout on are compared number for number.
DROPOUTS = dict(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)


# ------------------------------------------------------------------ the fused LoRA op
def plain_lora(x, W, b, A, B, s, keep=None, p=0.0):
    """The unfused composition, module by module: W x + b + s * B (A dropout(x))."""
    d = x if keep is None else x * keep / (1 - p)
    return F.linear(x, W, b) + F.linear(F.linear(d, A), B) * s


def lora_inputs(dtype, seed=0, dims=(2, 5), n_in=12, n_out=18, r=4):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    x = rand(*dims, n_in).requires_grad_()
    W, b = rand(n_out, n_in), rand(n_out)
    A, B = rand(r, n_in).requires_grad_(), rand(n_out, r).requires_grad_()  # B != 0: a real test
    keep = torch.rand(*dims, n_in, generator=g) >= 0.3
    return x, W, b, A, B, keep


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("train_base", [False, True])
def test_fused_lora_gradcheck(dropout, train_base):
    x, W, b, A, B, keep = lora_inputs(torch.float64)
    W.requires_grad_(train_base)
    b.requires_grad_(train_base)
    keep, q = (keep, 1 / 0.7) if dropout else (None, 1.0)
    f = lambda x, W, b, A, B: LoraLinearFunction.apply(x, W, b, A, B, 2.0, keep, q)[0]
    assert torch.autograd.gradcheck(f, (x, W, b, A, B))


@pytest.mark.parametrize("dropout", [False, True])
def test_fused_lora_equals_plain_composition_float32(dropout):
    x, W, b, A, B, keep = lora_inputs(torch.float32, seed=1, dims=(3, 7), n_in=64, n_out=96)
    p = 0.3 if dropout else 0.0
    keep = keep if dropout else None
    y_ref = plain_lora(x, W, b, A, B, 0.5, keep, p)
    y, u = LoraLinearFunction.apply(x, W, b, A, B, 0.5, keep, 1 / (1 - p))
    assert not u.requires_grad  # returned for setup_context to keep, not differentiable
    assert (y - y_ref).abs().max() <= 1e-5
    g = torch.randn_like(y)
    ref = torch.autograd.grad(y_ref, (x, A, B), g)
    got = torch.autograd.grad(y, (x, A, B), g)
    for a, c in zip(got, ref):
        assert (a - c).abs().max() <= 1e-4 * c.abs().max()


@pytest.mark.parametrize("dropout", [False, True])
def test_fused_lora_under_bf16_autocast_equals_autograds_composition(dropout):
    """Under autocast the op computes as autograd does through the plain composition of
    linear layers (PEFT's layers): every product in bf16, the backward's thin ones too; the
    adapter gradients come back in fp32. Without dropout bit for bit (the fp32 thin products
    this op used before differed by 0.2-0.5%); with it, the 1 / (1 - p) is applied to u, not
    to x, so within bf16's rounding."""
    x, W, b, A, B, keep = lora_inputs(torch.float32, seed=1, dims=(3, 7), n_in=64, n_out=96)
    p = 0.3 if dropout else 0.0
    keep = keep if dropout else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = plain_lora(x, W, b, A, B, 0.5, keep, p)
        y, _ = LoraLinearFunction.apply(x, W, b, A, B, 0.5, keep, 1 / (1 - p))
    assert y.dtype == y_ref.dtype == torch.bfloat16
    g = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, (x, A, B), g)
    ref = torch.autograd.grad(y_ref, (x, A, B), g)
    tol = 2e-2 if dropout else 0.0
    assert (y.float() - y_ref.float()).abs().max() <= tol * y_ref.float().abs().max()
    for a, c in zip(got, ref):
        assert a.dtype == c.dtype == torch.float32
        assert (a - c).abs().max() <= tol * c.abs().max()


def test_fused_lora_saves_x_mask_and_u_only():
    """No dropped-out copy of x and nothing for the frozen W is kept for the backward."""
    x, W, b, A, B, keep = lora_inputs(torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LoraLinearFunction.apply(x, W, b, A, B, 2.0, keep, 1 / 0.7)
    kinds = sorted((tuple(t.shape), str(t.dtype)) for t in saved)
    f32, shape = str(torch.float32), tuple(x.shape)
    assert kinds == sorted([(shape, f32), (shape, str(torch.bool)), ((2, 5, 4), f32),  # x, mask, u
                            (tuple(W.shape), f32), (tuple(A.shape), f32),             # parameters,
                            (tuple(B.shape), f32)])                                   # by reference
    assert saved[0] is x and any(t is W for t in saved)  # x and W themselves, not copies


def test_lora_layer_dropout_draws_one_mask():
    """In training, LoraLinear's output is the plain composition under a Bernoulli(1 - p)
    mask drawn from torch's generator (keep_mask's 32-bit draws); in eval mode no mask at all."""
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(12, 18), r=4, lora_alpha=8, lora_dropout=0.25)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 12)
    W, b, A, B = (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.weight,
                  layer.lora_B.weight)
    torch.manual_seed(7)
    y = layer.train()(x)
    torch.manual_seed(7)
    keep = reference_keep(x.shape, 0.25)
    assert 0 < keep.sum() < keep.numel()
    assert (y - plain_lora(x, W, b, A, B, 2.0, keep, 0.25)).abs().max() <= 1e-5
    assert (layer.eval()(x) - plain_lora(x, W, b, A, B, 2.0)).abs().max() <= 1e-5


def test_merged_layer_equals_unmerged():
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(12, 18), r=4, lora_alpha=8, lora_dropout=0.1).eval()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)  # one matmul with W + s B A
        layer.unmerge()
    assert (merged - unmerged).abs().max() <= 1e-5
    assert torch.equal(layer(x).detach(), unmerged)


def test_explain_lora_op_and_lora_block_have_no_graph_break():
    x, W, b, A, B, _ = lora_inputs(torch.float32)
    out = torch._dynamo.explain(lora_linear)(x, W, b, A, B, 2.0, 0.1)
    assert out.graph_break_count == 0 and out.graph_count == 1, out.break_reasons
    model = get_peft_model(GPT(GPTConfig(**TINY)), LoraConfig(r=4, lora_dropout=0.1)).train()
    block = model.get_base_model().transformer.h[1]
    h = torch.randn(2, 7, TINY["n_embd"], requires_grad=True)
    out = torch._dynamo.explain(block)(h)
    assert out.graph_break_count == 0 and out.graph_count == 1, out.break_reasons

# ------------------------------------------------------------------ compiled blocks
def lora_gpt(seed=0):
    """A tiny GPT with LoRA on c_attn, every dropout on; B made non-zero so every
    gradient is a real test."""
    torch.manual_seed(seed)
    model = get_peft_model(GPT(GPTConfig(**{**TINY, **DROPOUTS})),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks for every model
    loss = model(ids, labels=labels, return_logits=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def assert_close_grads(a, b, tol=1e-5):
    assert a.keys() == b.keys() and a
    for name in a:
        assert (a[name] - b[name]).abs().max() <= tol, name


def batch(T, seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (B, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 3] = -100  # a prompt carrying no loss
    return ids, labels


@pytest.fixture(scope="module")
def eager_and_compiled():
    """The same LoRA GPT twice, the second with compiled blocks (one compilation, below)."""
    torch._dynamo.reset()  # start from empty caches so the counts below are ours
    counters.clear()
    return lora_gpt(), compile_blocks(lora_gpt())


def test_compiled_masks_are_drawn_in_program_order():
    """Four masks in one compiled graph with a gradient (so AOTAutograd partitions it), none
    depending on another, the second for a smaller tensor: the very masks eager code draws,
    in its order, at two lengths of one dynamic graph. Inductor orders ops by their data only,
    and drew the second mask first until keep_mask's op declared _DRAW_ORDER."""
    def f(x, y):
        a = x * keep_mask(x.shape, 0.3, x.device)
        b = y * keep_mask(y.shape, 0.1, y.device)
        c = a * keep_mask(x.shape, 0.2, x.device)
        return a, b, c, b.relu() * keep_mask(y.shape, 0.6, y.device)
    torch._dynamo.reset()
    compiled, y = torch.compile(f, dynamic=True), torch.ones(7, 33)
    for n in (1000, 1100):
        x = torch.ones(4, n, requires_grad=True)
        torch.manual_seed(0)
        eager, after_eager = f(x, y), torch.get_rng_state()
        torch.manual_seed(0)
        for e, c in zip(eager, compiled(x, y)):
            assert torch.equal(e, c)
        assert torch.equal(torch.get_rng_state(), after_eager)   # the same draws consumed


def test_explain_block_has_no_graph_break():
    # with attention dropout, attention takes ops.AttentionDropout on the CPU
    block = Block(GPTConfig(**{**TINY, **DROPOUTS})).train()
    x = torch.randn(2, 7, TINY["n_embd"], requires_grad=True)
    out = torch._dynamo.explain(block)(x)
    assert out.graph_break_count == 0 and out.graph_count == 1, out.break_reasons


def test_compiled_step_equals_eager_and_new_length_does_not_recompile(eager_and_compiled):
    eager, compiled = eager_and_compiled
    for T in (16, 23, 40):  # the first length compiles; the others must reuse its graphs
        ids, labels = batch(T, seed=T)
        l_e, g_e = loss_and_grads(eager, ids, labels)
        l_c, g_c = loss_and_grads(compiled, ids, labels)
        assert abs(l_e - l_c) <= 1e-5
        assert_close_grads(g_e, g_c)
        if T == 16:
            compiled_after_first = dict(counters["stats"])
    assert dict(counters["stats"]) == compiled_after_first  # no recompilation
    # Two graphs for n_layer = 3 blocks: block 0's input (frozen embeddings) needs no
    # gradient, which the guards tell apart; blocks 1 and 2 share the second graph.
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_compiled_with_checkpointing_equals_eager(eager_and_compiled):
    eager, compiled = eager_and_compiled
    ids, labels = batch(20, seed=5)
    l_e, g_e = loss_and_grads(eager, ids, labels)
    compiled.get_base_model().gradient_checkpointing = True
    try:
        l_c, g_c = loss_and_grads(compiled, ids, labels)
    finally:
        compiled.get_base_model().gradient_checkpointing = False
    assert abs(l_e - l_c) <= 1e-5
    assert_close_grads(g_e, g_c)


def test_train_with_compile_equals_eager(eager_and_compiled):
    """TrainConfig.compile=True (train.py calls compile_blocks): the same losses and weights.
    Runs after the fixture compiled the same block code, so no new compilation is needed."""
    from minift.config import TrainConfig
    from minift.train import train
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, TINY["vocab_size"], (8, 16), generator=g).tolist()
    data = [{"input_ids": r, "labels": r} for r in rows]  # one length: no padding mask
    runs = []
    for compile_ in (False, True):
        model, losses = lora_gpt(seed=1), []
        config = TrainConfig(max_steps=2, batch_size=4, lr=1e-2, compile=compile_,
                             log_every=100, eval_every=100, bf16=False)
        train(model, data, config=config, callback=lambda rec: losses.append(rec["loss"]))
        runs.append((losses, [p.detach() for p in model.parameters() if p.requires_grad]))
        # compile_blocks is in place and lasting: each block's call goes through torch.compile
        blocks = model.get_base_model().transformer.h
        assert [b._compiled_call_impl is not None for b in blocks] == [compile_] * len(blocks)
    (l_e, p_e), (l_c, p_c) = runs
    # float32 rounding of inductor's fused kernels: the losses differed by ~5e-7 here, not 0.0
    assert len(l_e) == 2 and max(abs(a - b) for a, b in zip(l_e, l_c)) <= 1e-5
    assert max((a - b).abs().max() for a, b in zip(p_e, p_c)) <= 1e-5


@pytest.mark.parametrize("method", ["full", "lora"])
def test_torch_func_per_example_gradients(method):
    """torch.func's vmap(grad(...)) through full fine-tuning (c_proj runs ops.ActLinear) and
    LoRA (LoraLinearFunction): per-example gradients equal one backward per example."""
    from torch.func import functional_call, grad, vmap
    model = GPT(GPTConfig(**TINY))  # no dropout
    if method == "lora":
        model = lora_gpt()
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(0, TINY["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(0))

    def loss(p, x):
        return functional_call(model, p, (x[None],), {"labels": x[None]}).loss

    per_example = vmap(grad(loss), in_dims=(None, 0))(params, ids)
    for i in range(len(ids)):
        model.zero_grad()
        model(ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert (per_example[n][i] - p.grad).abs().max() <= 1e-6, n


def test_compile_blocks_needs_blocks():
    with pytest.raises(ValueError, match="no transformer Block"):
        compile_blocks(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ the bench's FLOP count
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench  # noqa: E402  (scripts/bench.py)
import bench_runs  # noqa: E402  (scripts/bench_runs.py)
import bench_paired  # noqa: E402  (scripts/bench_paired.py)


@pytest.mark.parametrize("case", ["lora", "full", "prefix", "masked"])  # (dora: extra work)
def test_bench_flop_count_equals_torch_flop_counter(case, tmp_path):
    """scripts/bench.py's analytic count equals torch's FlopCounterMode on one real step of
    each stack (full-square attention: the math kernel under dropout computes it all), so
    both stacks do the same matmuls apart from the LM head, which transformers runs at
    every position and minift at target positions only, and minift's recomputation of
    the attention core in the backward (one more QK^T per layer: checkpoint stops before
    AV, whose output the backward does not need)."""
    from torch.utils.flop_counter import FlopCounterMode
    shape = bench_runs.Shape(2, 2, 32, 97, 64)
    bench_runs.save_reference_model(shape, tmp_path)
    ids, labels = bench_runs.make_batch(shape.vocab_size, 2, 16, case)
    n_target = int((labels[:, 1:] != -100).sum())
    for stack, head_tokens in (("minift", n_target), ("hf", ids.numel())):
        torch.manual_seed(0)
        if stack == "hf":
            _, loss_fn = bench_runs.build_hf(tmp_path, case)
        else:
            _, loss_fn = bench_runs.build_minift(tmp_path, case, compiled=False)
        with FlopCounterMode(display=False) as counter:
            loss_fn(ids, labels).backward()
        expected = bench_runs.matmul_flops(shape, case, 2, 16, n_target, head_tokens, causal=False)
        if stack == "minift":
            expected += shape.n_layer * bench_runs.attention_flops(shape, case, 2, 16, False) // 2
        assert counter.get_total_flops() == expected, stack


def test_bench_inductor_cache_folders_have_no_spaces(tmp_path):
    """Row names hold spaces ("bf16 lora"); inductor's g++ command line does not quote the
    cache path, so a space in it broke every compiled run of such a row."""
    folders = {bench.inductor_cache(tmp_path, row, rep)
               for row in bench_runs.ROWS for rep in (0, 1)}
    assert len(folders) == 2 * len(bench_runs.ROWS)          # one fresh folder per row and round
    assert all(f.parent == tmp_path and not any(c.isspace() for c in f.name) for f in folders)


def test_bench_reports_each_rounds_ratio_to_the_reference():
    """Per round, each run's tokens/s over the reference's in that same round, and their
    median; a failed round is skipped, a failed run left out."""
    results = {"lora": {"transformers+peft": {"all_tokens_per_s": [200.0, 100.0, 250.0]},
                        "minift": {"all_tokens_per_s": [300.0, None, 200.0]},
                        "minift compiled": {"error": "boom"}}}
    lines = bench.rounds_report(results)
    assert lines[1].split() == ["lora", "transformers+peft", "200.0,", "100.0,", "250.0"]
    assert lines[2].endswith("| x ref 1.50, 0.80 (1.15)") and "-" in lines[2]
    assert len(lines) == 3


def test_bench_compiled_loss_tolerance_follows_the_rows_dtype():
    """Compiled and eager eval losses 1.2e-4 apart: bf16's rounding (met), not float32's."""
    run = {"tokens_per_s": 150, "peak_rss_gb": 1, "of_bound": 0.8,
           "eval_loss_compiled": 10.0, "eval_loss_eager": 10.00012}
    ref = {"tokens_per_s": 100, "peak_rss_gb": 1}
    lines = bench.check_targets({row: {"transformers+peft": ref, "minift compiled": run}
                                 for row in ("lora", "bf16 lora")})
    loss = {line.split()[0] + (" lora" if line.split()[0] == "bf16" else ""): line
            for line in lines if "eval loss" in line}
    assert loss["lora"].endswith("(<= 1e-05): MISSED"), loss
    assert loss["bf16 lora"].endswith("(<= 0.02): met"), loss


def test_bench_stepper_keeps_the_last_loss_until_the_next_step_returns(tmp_path):
    """As the guides' loop keeps `loss` (and what its graph still holds) until the next
    forward returns, so does bench's step: without it the reference's peak RSS fell by
    1.0 GB. One loss is kept, the latest: the one before is freed."""
    import weakref
    bench_runs.save_reference_model(bench_runs.Shape(2, 2, 32, 97, 64), tmp_path)
    run = bench_runs.make_stepper("minift", "lora", "train", "fp32", 2, 16, tmp_path)
    first = run.step()
    kept = weakref.ref(run.held[0])
    assert run.held[0].grad_fn is not None and run.held[0].item() == first
    second = run.step()
    assert kept() is None and len(run.held) == 1 and run.held[0].item() == second


@pytest.mark.parametrize("script, argv, expect", [
    ("bench_linear.py", ["--quick", "--steps", "1", "--generate"],
     "train() LoRA step, MKL's time / oneDNN's"),
    ("bench_generate.py", ["--quick"], "same token ids: True")])
def test_bench_scripts_quick_smoke(script, argv, expect):
    """The product and generation benchmarks run end to end on tiny shapes (timings are
    theirs to print, not the tests' to check)."""
    import subprocess
    done = subprocess.run([sys.executable, str(Path(bench.__file__).parent / script), *argv],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expect in done.stdout, done.stdout


def test_bench_paired_ratio_is_the_geometric_mean_of_pairs():
    """Pairs (t_ref / t_minift) 2, 1/2, 1, 1: geometric mean 1 (the arithmetic mean of the
    ratios, 1.125, would favour whichever side the slow pairs hit); median, range and each
    side's median tokens/s; the interval brackets the mean."""
    s = bench_paired.summary([2.0, 1.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], tokens=1024, block=1)
    assert s["ratio"] == pytest.approx(1.0, abs=1e-12) and s["median"] == 1.0
    assert (s["min"], s["max"], s["pairs"]) == (0.5, 2.0, 4)
    assert s["low"] <= 1.0 <= s["high"] and s["low"] < s["high"]
    assert s["ref_tokens_per_s"] == pytest.approx(1024 / 2.5)
    assert s["minift_tokens_per_s"] == pytest.approx(1024 / 2.5)
    slower = bench_paired.summary([4.0] * 5, [2.0, 2.0, 2.0, 2.0, 2.0], tokens=10)
    assert slower["ratio"] == pytest.approx(2.0) and slower["low"] == pytest.approx(2.0)
