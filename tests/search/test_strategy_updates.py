"""Each strategy's update pinned against a hand-written reference: the gradient every parameter group must
see (after clipping) and the optimizer's formula, for the weights and for alpha, over two steps.

The tool runs its own loop (``train_one_epoch``) on a tiny supernet; the reference repeats the same steps
on a copy of the model with ``torch.autograd.grad`` and AdamW / Adam written out by hand.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from nas.data import build_loader, set_epoch
from nas.engine.distributed import DistEnv
from nas.engine.loop import new_loop_state, train_one_epoch
from nas.engine.run_log import RunLogger
from nas.models import arch_parameters, create_model, set_active_paths
from nas.search.strategies import create_strategy, heldout_pass_seed, list_strategies, step_seed

LR, ALPHA_LR, WD, CLIP, SMOOTH, EPS = 2e-2, 5e-2, 0.05, 0.05, 0.1, 1e-8
BATCH, STEPS, SEED = 4, 2, 3


class Tensors(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class NoBar:
    def update(self, *args, **kwargs):
        pass


def tiny_supernet():
    torch.manual_seed(0)
    model = create_model("local_vim_demo_search", img_size=8, depth=1, embed_dim=8, num_classes=3, d_state=4)
    with torch.no_grad():  # alphas far enough apart that the softmax is not flat
        for a in arch_parameters(model):
            a.copy_(torch.randn(a.shape))
    return model


def train_cfg(epochs=10**6):
    # so many epochs that the cosine schedule keeps every lr at its base value over these steps (to 1e-12)
    return {"epochs": epochs, "warmup_epochs": 0, "warmup_lr": 0.0, "min_lr": 0.0, "lr": LR, "weight_decay": WD,
            "clip_grad": CLIP, "label_smoothing": SMOOTH, "amp": "none", "max_bad_steps": 3}


def strategy_cfg(name, warmup=0):
    return {"name": name, "k": 3, "alpha_lr": ALPHA_LR, "alpha_weight_decay": 0.01, "alpha_betas": [0.5, 0.999],
            "alpha_warmup_epochs": warmup}


def run_tool(name, epochs=(0,), warmup=0):
    """The strategy's steps as the search runs them; returns (model, strategy, gradients seen per step)."""
    model = tiny_supernet()
    train = train_cfg()
    strategy = create_strategy(strategy_cfg(name, warmup), model, train, SEED, None, "")
    optimizer = strategy.build_optimizer()
    seen = []  # per optimizer step: {param id: gradient it stepped on}
    for opt in (optimizer, getattr(strategy, "alpha_opt", None)):
        if opt is not None:
            opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(
                {id(p): p.grad.clone() for g in o.param_groups for p in g["params"] if p.grad is not None}))
    loader = build_loader(Tensors(BATCH * STEPS, 1), BATCH, True, 0, 11)
    if strategy.needs_heldout:
        strategy.set_heldout(build_loader(Tensors(BATCH * STEPS, 2), BATCH, True, 0, 12))
    state, logger = new_loop_state(), RunLogger("", enabled=False, tensorboard=False, progress=False)
    for epoch in epochs:
        set_epoch(loader, epoch)
        state["batch"] = 0
        train_one_epoch(model, loader, optimizer, strategy, train, DistEnv(), state, epoch, NoBar(), logger)
    return model, strategy, seen


def batches(seed_data, seed_loader, loader_epoch):
    loader = build_loader(Tensors(BATCH * STEPS, seed_data), BATCH, True, 0, seed_loader)
    set_epoch(loader, loader_epoch)
    return list(loader)


class AdamRef:
    """Adam / AdamW written out: decoupled (AdamW: p *= 1 - lr*wd) or L2 (Adam: g += wd*p) weight decay."""

    def __init__(self, betas=(0.9, 0.999), decoupled=True):
        self.b1, self.b2, self.decoupled = *betas, decoupled
        self.m, self.v, self.t = {}, {}, {}

    def step(self, p, g, lr, wd):
        key = id(p)
        if not self.decoupled:
            g = g + wd * p
        m = self.m[key] = self.b1 * self.m.get(key, torch.zeros_like(p)) + (1 - self.b1) * g
        v = self.v[key] = self.b2 * self.v.get(key, torch.zeros_like(p)) + (1 - self.b2) * g * g
        t = self.t[key] = self.t.get(key, 0) + 1
        new = p * (1 - lr * wd) if self.decoupled else p
        return new - lr / (1 - self.b1 ** t) * m / (v.sqrt() / math.sqrt(1 - self.b2 ** t) + EPS)


def no_decay(name, p):
    # norms, biases, D (1-D), A_log (marked), the position embedding and class token: no weight decay
    return p.ndim <= 1 or name.split(".")[-1].startswith("A_log") or name.endswith(("pos_embed", "cls_token"))


def loss_of(model, x, y):
    return F.cross_entropy(model(x).float(), y, label_smoothing=SMOOTH)


def clipped(grads: dict) -> dict:
    """torch's clip_grad_norm_: scale by min(1, max_norm / (total 2-norm + 1e-6)) over the given gradients."""
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    scale = min(1.0, CLIP / (total + 1e-6))
    return {k: g * scale for k, g in grads.items()}


class Reference:
    """The same model, stepped by hand."""

    def __init__(self):
        self.model = tiny_supernet()
        self.model.train()
        self.alphas = arch_parameters(self.model)
        alpha_ids = {id(a) for a in self.alphas}
        self.weights = [(n, p) for n, p in self.model.named_parameters() if id(p) not in alpha_ids]
        self.adamw, self.alpha_adam = AdamRef(), AdamRef((0.5, 0.999), decoupled=False)
        self.seen = []

    def weight_step(self, x, y, alpha_trains: bool):
        """Joint / sampled / bilevel's weight step. alpha_trains: alpha is in this AdamW (joint, sampled
        after warm-up) and steps on this batch's gradient, unclipped."""
        params = [p for _, p in self.weights] + (self.alphas if alpha_trains else [])
        grads = torch.autograd.grad(loss_of(self.model, x, y), params, allow_unused=True)
        gw = {id(p): g for p, g in zip(params[:len(self.weights)], grads) if g is not None}
        gw = clipped(gw)  # the weights' norm only: alpha is never part of it
        ga = {id(a): g for a, g in zip(self.alphas, grads[len(self.weights):])}
        self.seen.append({**gw, **ga})
        with torch.no_grad():
            for name, p in self.weights:
                if id(p) in gw:  # AdamW skips parameters without a gradient (sampled: inactive paths)
                    p.copy_(self.adamw.step(p, gw[id(p)], LR, 0.0 if no_decay(name, p) else WD))
            for a in self.alphas:
                if id(a) in ga:
                    a.copy_(self.adamw.step(a, ga[id(a)], ALPHA_LR, 0.01))

    def alpha_step(self, x, y):
        """Bilevel: Adam(betas 0.5, 0.999; L2 decay 0.01) on the held-out batch's alpha gradient alone."""
        grads = torch.autograd.grad(loss_of(self.model, x, y), self.alphas)
        self.seen.append({id(a): g for a, g in zip(self.alphas, grads)})
        with torch.no_grad():
            for a, g in zip(self.alphas, grads):
                a.copy_(self.alpha_adam.step(a, g, ALPHA_LR, 0.01))


def assert_same(tool_model, tool_seen, ref: Reference):
    tool_params = dict(tool_model.named_parameters())
    for name, p in ref.model.named_parameters():
        torch.testing.assert_close(tool_params[name].detach(), p.detach(), rtol=0, atol=1e-6, msg=name)
    # the gradients each optimizer step used, matched by parameter name
    names_tool = {id(p): n for n, p in tool_model.named_parameters()}
    names_ref = {id(p): n for n, p in ref.model.named_parameters()}
    assert len(tool_seen) == len(ref.seen)
    for i, (t, r) in enumerate(zip(tool_seen, ref.seen)):
        t = {names_tool[k]: g for k, g in t.items()}
        r = {names_ref[k]: g for k, g in r.items()}
        assert t.keys() == r.keys(), (i, sorted(t.keys() ^ r.keys()))
        for n in r:
            torch.testing.assert_close(t[n], r[n], rtol=0, atol=1e-6, msg=f"step {i}: {n}")


def test_every_registered_strategy_is_pinned_here():
    assert set(list_strategies()) == {"joint", "bilevel", "sampled"}


def test_joint_update_matches_reference():
    model, _, seen = run_tool("joint")
    ref = Reference()
    for x, y in batches(1, 11, 0):
        ref.weight_step(x, y, alpha_trains=True)
    assert_same(model, seen, ref)


@pytest.mark.parametrize("name", ["joint", "sampled"])
def test_alpha_warmup_leaves_alpha_and_its_optimizer_state_untouched(name):
    model, strategy, seen = run_tool(name, epochs=(0,), warmup=1)
    torch.testing.assert_close(torch.stack(arch_parameters(model)), torch.stack(arch_parameters(tiny_supernet())),
                               rtol=0, atol=0)
    alpha_ids = {id(a) for a in arch_parameters(model)}
    assert all(not (alpha_ids & step.keys()) for step in seen)  # no optimizer step ever saw an alpha gradient


def test_bilevel_update_matches_reference():
    model, _, seen = run_tool("bilevel")
    ref = Reference()
    held = batches(2, 12, heldout_pass_seed(0, 0))
    for (x, y), (hx, hy) in zip(batches(1, 11, 0), held):
        ref.alpha_step(hx, hy)
        ref.weight_step(x, y, alpha_trains=False)
    assert_same(model, seen, ref)  # per training step: alpha's step, then the weights'



def test_bilevel_after_warmup_steps_on_the_heldout_gradient_alone():
    # epoch 0 trains only the weights (their backward also reaches alpha); epoch 1's first alpha step must
    # use the held-out gradient alone, not that plus everything accumulated during the warm-up
    model, _, seen = run_tool("bilevel", epochs=(0, 1), warmup=1)
    ref = Reference()
    for x, y in batches(1, 11, 0):
        ref.weight_step(x, y, alpha_trains=False)
    held = batches(2, 12, heldout_pass_seed(1, 0))
    for (x, y), (hx, hy) in zip(batches(1, 11, 1), held):
        ref.alpha_step(hx, hy)
        ref.weight_step(x, y, alpha_trains=False)
    assert_same(model, seen, ref)


def gumbel_top3(alpha, step):
    """Three directions drawn without replacement from softmax(alpha) with step's generator, sorted."""
    gen = torch.Generator().manual_seed(step_seed(SEED, step))
    u = torch.rand(8, generator=gen).clamp(1e-10, 1.0)
    return sorted((alpha.detach().view(-1).log_softmax(0) - (-u.log()).log()).topk(3).indices.tolist())


def test_sampled_update_matches_reference():
    model, _, seen = run_tool("sampled")
    ref = Reference()
    for step, (x, y) in enumerate(batches(1, 11, 0)):
        set_active_paths(ref.model, [gumbel_top3(a, step) for a in ref.alphas])
        ref.weight_step(x, y, alpha_trains=True)
    assert_same(model, seen, ref)
    # only the drawn paths' own weights had gradients in the first step
    active = set(gumbel_top3(arch_parameters(tiny_supernet())[0], 0))
    stepped = {n for n, p in model.named_parameters() if id(p) in seen[0]}
    assert {i for i in range(8) if f"layers.0.mixer.x_proj_{i}.weight" in stepped} == active


def test_sampled_merge_gradient_reaches_every_alpha():
    # the estimator's point: inactive directions' alphas get a gradient through the softmax's normalization
    # (the reference above shares the model's merge, so it cannot see this property)
    model, _, seen = run_tool("sampled")
    alpha = arch_parameters(model)[0]
    assert (seen[0][id(alpha)].view(-1) != 0).all()
