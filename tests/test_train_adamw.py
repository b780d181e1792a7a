"""The AdamW groups' multi-tensor Triton update (ops/triton_adamw.py, train/adamw.py) against torch's AdamW."""
import pytest
import torch

from ops.triton_adamw import adamw_step
from train.adamw import AdamW

LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.95), 1e-8


def device():
    """The kernel on CUDA tensors, or on CPU ones under TRITON_INTERPRET when there is no GPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensors(dev, seed=0):
    """Sizes over one and several programs, a size that is not a multiple of 4, a view whose data is not 16-byte
    aligned (the launch without vector accesses), an empty tensor and a scalar."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(40, 64), (1031,), (3, 5), (0,), ()]
    out = [torch.randn(s, generator=g).to(dev) for s in shapes]
    out.append(torch.randn(2049, generator=g).to(dev)[1:])  # 2048 elements at a 4-byte offset
    return out


def torch_reference(params, grads_per_step, lr=LR, wd=WD, grad_scale=None, start_steps=0):
    """torch's single-tensor AdamW (the spec), with the fused kernels' grad_scale applied by hand."""
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(ref, lr=lr, weight_decay=wd, betas=BETAS, eps=EPS, foreach=False)
    for grads in grads_per_step:
        for r, gr in zip(ref, grads):
            r.grad = gr.clone() if grad_scale is None else gr / grad_scale
        opt.step()
    return [r.detach() for r in ref], opt


def kernel_steps(params, grads_per_step, grad_scale=None, copies=None):
    """The kernel's steps over grads_per_step from fresh moments: the stepped copies of params."""
    ps = [p.clone() for p in params]
    ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    steps = [torch.zeros((), device=p.device) for p in ps]
    for grads in grads_per_step:
        for s in steps:
            s += 1
        adamw_step(ps, grads, ms, vs, steps, lr=LR, weight_decay=WD, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                   grad_scale=grad_scale, copies=copies)
    return ps


@pytest.mark.any_device  # the kernel's tensors on the GPU when there is one
@pytest.mark.parametrize("scaled", [False, True])
def test_kernel_steps_like_torch_adamw(scaled):
    dev = device()
    params = tensors(dev)
    grads_per_step = [[torch.randn_like(p) for p in params] for _ in range(3)]
    grad_scale = torch.tensor(2.5, device=dev) if scaled else None
    want, _ = torch_reference(params, grads_per_step, grad_scale=grad_scale)
    ps = kernel_steps(params, grads_per_step, grad_scale)
    for got, ref, p0 in zip(ps, want, params):
        assert got.shape == ref.shape
        if p0.numel():
            assert not torch.equal(got, p0)  # every tensor moved
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.any_device
def test_kernel_reads_each_tensors_own_step_count():
    dev = device()
    params = tensors(dev)[:3]
    grads = [torch.randn_like(p) for p in params]
    ms = [torch.randn_like(p) * 0.1 for p in params]
    vs = [torch.rand_like(p) * 0.01 for p in params]
    counts = [1, 7, 30]
    ps = [p.clone() for p in params]
    adamw_step(ps, grads, [m.clone() for m in ms], [v.clone() for v in vs],
               [torch.tensor(float(c), device=dev) for c in counts], lr=LR, weight_decay=WD, beta1=BETAS[0],
               beta2=BETAS[1], eps=EPS)
    for got, p, g, m, v, c in zip(ps, params, grads, ms, vs, counts):
        m1 = m + (1 - BETAS[0]) * (g - m)
        v1 = v * BETAS[1] + (1 - BETAS[1]) * g * g
        want = p * (1 - LR * WD) - LR / (1 - BETAS[0] ** c) * m1 / (v1.sqrt() / (1 - BETAS[1] ** c) ** 0.5 + EPS)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.any_device
def test_kernel_writes_nothing_outside_its_tensors():
    """Every tensor a view of one buffer, with 4 sentinel elements after each: the sentinels stay as they were."""
    dev = device()
    sizes = [1030, 7, 1024, 3]
    gap = 4
    def views(buf):
        out, at = [], 0
        for n in sizes:
            out.append(buf[at:at + n])
            at += n + gap
        return out
    total = sum(sizes) + gap * len(sizes)
    bufs = [torch.randn(total, device=dev) for _ in range(4)]
    kept = [b.clone() for b in bufs]
    ps, gs, ms, vs = (views(b) for b in bufs)
    vs = [v.abs() for v in vs]  # a second moment is >= 0; copies, so the buffer's sentinels are not in vs
    adamw_step(ps, gs, ms, vs, [torch.ones((), device=dev) for _ in sizes], lr=LR, weight_decay=WD,
               beta1=BETAS[0], beta2=BETAS[1], eps=EPS)
    at = 0
    for n in sizes:
        for b, k in zip(bufs, kept):
            assert torch.equal(b[at + n:at + n + gap], k[at + n:at + n + gap])
        assert not torch.equal(bufs[0][at:at + n], kept[0][at:at + n])
        at += n + gap


def test_kernel_rejects_mismatched_lists():
    p = torch.zeros(4)
    with pytest.raises(ValueError, match="one length"):
        adamw_step([p], [p], [p], [p], [], lr=LR, weight_decay=WD, beta1=0.9, beta2=0.95, eps=EPS)
    with pytest.raises(ValueError, match="fp32"):
        adamw_step([p], [p.double()], [p], [p], [torch.zeros(())], lr=LR, weight_decay=WD, beta1=0.9, beta2=0.95,
                   eps=EPS)


def two_groups(dev):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)).to(dev)
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return model, [dict(params=decay, weight_decay=WD), dict(params=no_decay, weight_decay=0.0)]


def run_optimizer(make, dev, steps=3, grad_scale=None):
    model, groups = two_groups(dev)
    opt = make(groups)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).to(dev)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.grad_scale = grad_scale
        opt.step()
    return model, opt


@pytest.mark.any_device
def test_optimizer_with_the_kernel_equals_torch_adamw_and_saves_torchs_state():
    dev = device()
    scale = torch.tensor(3.0, device=dev)
    fused = dev.type == "cuda"  # torch's grad_scale contract is the fused kernels'
    ours, ours_opt = run_optimizer(lambda g: AdamW(g, kernel="triton", lr=LR, betas=BETAS, eps=EPS, fused=fused),
                                   dev, grad_scale=scale if fused else None)
    ref, ref_opt = run_optimizer(lambda g: torch.optim.AdamW(g, lr=LR, betas=BETAS, eps=EPS, fused=fused), dev,
                                 grad_scale=scale if fused else None)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    state, ref_state = ours_opt.state_dict(), ref_opt.state_dict()
    assert state["param_groups"] == ref_state["param_groups"]
    for i, s in state["state"].items():
        assert set(s) == set(ref_state["state"][i]) == {"step", "exp_avg", "exp_avg_sq"}
        assert s["step"].device == ref_state["state"][i]["step"].device and float(s["step"]) == 3.0
        torch.testing.assert_close(s["exp_avg_sq"], ref_state["state"][i]["exp_avg_sq"], rtol=1e-5, atol=1e-12)
    # a checkpoint of either loads into the other and steps on alike
    ref_opt.load_state_dict(state)
    ours_opt.load_state_dict(ref_state)


def test_auto_on_cpu_is_torchs_update_exactly():
    dev = torch.device("cpu")
    ours, _ = run_optimizer(lambda g: AdamW(g, kernel="auto", lr=LR, betas=BETAS, eps=EPS, foreach=False), dev)
    ref, _ = run_optimizer(lambda g: torch.optim.AdamW(g, lr=LR, betas=BETAS, eps=EPS, foreach=False), dev)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.any_device
def test_a_group_the_kernel_cannot_take_steps_through_torch():
    """amsgrad on one group: that group is torch's, the other the kernel's, in the same step; kernel=triton refuses."""
    dev = device()
    model, groups = two_groups(dev)
    groups[1]["amsgrad"] = True
    opt = AdamW(groups, kernel="auto" if dev.type == "cuda" else "triton", lr=LR, betas=BETAS, eps=EPS)
    model(torch.randn(5, 8, device=dev)).sum().backward()
    if dev.type == "cpu":
        with pytest.raises(RuntimeError, match="amsgrad"):
            opt.step()
        return
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all("max_exp_avg_sq" in opt.state[p] for p in groups[1]["params"])
    assert all("max_exp_avg_sq" not in opt.state[p] for p in groups[0]["params"])


def test_unknown_kernel_is_rejected_by_its_config_name():
    with pytest.raises(ValueError, match="optim.adamw_kernel"):
        AdamW([torch.nn.Parameter(torch.zeros(2))], kernel="cuda")


@pytest.mark.any_device
def test_kernel_follows_parameters_moved_and_state_loaded_between_steps():
    """A parameter's data replaced (`p.data = ...`) and a state loaded between steps: the next step updates the new
    tensors, as torch's AdamW does."""
    dev = device()
    results = []
    for make in (lambda g: AdamW(g, kernel="triton", lr=LR, betas=BETAS, eps=EPS),
                 lambda g: torch.optim.AdamW(g, lr=LR, betas=BETAS, eps=EPS, foreach=False)):
        model, groups = two_groups(dev)
        opt = make(groups)
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).to(dev)

        def step():
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()

        step()
        first = model[0].weight
        first.data = first.data.clone()  # new storage, same Parameter
        step()
        opt.load_state_dict(opt.state_dict())  # state in new tensors
        step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
