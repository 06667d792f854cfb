"""Search strategies: how the weights and the alphas are optimized. One class per strategy, registered by name.

- ``joint`` (LocalMamba): alpha is one more parameter group of the weights' AdamW, trained on the same
  batches; no weight decay on alpha unless ``alpha_weight_decay`` is set (the original decays it).
- ``bilevel`` (first-order DARTS): alpha has its own Adam (lr 3e-4, betas (0.5, 0.999), wd 1e-3 by
  default) and takes one step on a held-out batch before every weight step, on the held-out gradient alone.
- ``sampled``: like joint, but each step every layer runs only k of its 8 directions, drawn without
  replacement from softmax(alpha) (Gumbel top-k, one draw per layer shared by all ranks). The skipped
  directions' scans are not computed, which is where the memory goes. The k active outputs are merged
  with weights p_i / sg(sum of the active p): the magnitude of a convex combination, while the
  gradient still reaches every alpha through the softmax's normalization.

``path_dropout`` (joint, bilevel; 0 by default, LocalMamba's search): each weight step drops each path of every
layer with this probability (one path per layer always stays; the merge renormalizes over the rest, as in
``sampled``). With every path on in every step, the paths that learn a label first carry it alone and the loss no
longer needs the others, so a path that can carry it as well but learns later never gains alpha; trained alone
in some steps, every path that can carry the label learns to. The draw is seeded by the step: the same on every
rank and after a resume. Bilevel's alpha step runs the paths of the weight step that follows it (with every path
on, its held-out gradient favours the paths that already carry the label, and the others sink: measured in the
validity benchmark, 7 of 12 searches recovered the expected set that way, 12 of 12 with the shared draw).

Common to all: ``train.clip_grad`` clips the norm of the weights' gradients only; alpha's gradient is
never part of that norm (a large alpha gradient would otherwise shrink the weights' step) and is not
clipped (Adam's step does not depend on the gradient's scale). During ``alpha_warmup_epochs`` only the
weights train: alpha gets no gradient, so neither alpha nor its optimizer state changes.

A new strategy is one more ``Strategy`` subclass decorated with ``@register_strategy``.
"""
from __future__ import annotations

import dataclasses

import torch

from nas import config as cfglib
from nas.data import set_epoch
from nas.engine.distributed import all_reduce_sum
from nas.engine.loop import Task, autocast, topk_correct
from nas.engine.optim import adamw, weight_groups
from nas.errors import UserError
from nas.models import arch_parameters, search_candidates, search_scans, set_active_paths
from nas.models.search_space import AUTO, AUTO_MASS, fixed_counts
from nas.search import alphas as alpha_report
from nas.search.stopping import stop_settings, stop_state

STRATEGY_DEFAULTS = {
    "name": "joint",
    "k": 4,                      # directions kept per layer (derivation; sampled: active per step): an int, one
                                 # int per layer, or auto (per layer the fewest directions holding auto_mass)
    "auto_mass": AUTO_MASS,      # k: auto's share of a layer's probability (0.5 of a uniform 8 is 4 directions)
    "alpha_lr": None,            # joint/sampled: the weights' lr; bilevel: 3e-4
    "alpha_weight_decay": None,  # joint/sampled: 0; bilevel: 1e-3
    "alpha_betas": [0.5, 0.999],  # bilevel's Adam
    "alpha_warmup_epochs": 0,
    "path_dropout": 0.0,         # joint/bilevel: drop each path per weight step with this probability (docstring)
}

_REGISTRY: dict[str, type["Strategy"]] = {}


def register_strategy(cls: type["Strategy"]) -> type["Strategy"]:
    _REGISTRY[cls.name] = cls
    return cls


def list_strategies() -> tuple[str, ...]:
    return tuple(_REGISTRY)


STRATEGY_CHECKS = {
    # at most the number of candidates, one int per layer: nas.search.run checks both
    "k": cfglib.Check("an int >= 1, a list of them (one per layer) or auto",
                      lambda v: v == AUTO or cfglib.integer(1).ok(v)
                      or (isinstance(v, list) and bool(v) and all(cfglib.integer(1).ok(x) for x in v))),
    "auto_mass": cfglib.number(0, 1, low_open=True),
    "alpha_lr": cfglib.number(0, low_open=True).or_none("the strategy's default"),
    "alpha_weight_decay": cfglib.number(0).or_none("the strategy's default"),
    "alpha_betas": cfglib.number_pair(0, 1, high_open=True),
    "alpha_warmup_epochs": cfglib.integer(0),
    "path_dropout": cfglib.number(0, 1, high_open=True),
}


def check_strategy(cfg: dict) -> None:
    """One-line UserError for a bad ``strategy:`` section."""
    if cfg["name"] not in _REGISTRY:
        raise UserError(f"strategy.name: unknown strategy {cfg['name']!r}; expected one of "
                        f"{', '.join(list_strategies())}")
    cfglib.validate(cfg, STRATEGY_CHECKS, "strategy.")
    if cfg.get("path_dropout") and _REGISTRY[cfg["name"]].samples_k_paths:
        raise UserError(f"strategy.path_dropout: {cfg['name']} already runs k sampled paths per step; path dropout "
                        f"is for strategies that train every path (joint, bilevel)")
    if cfg["k"] == AUTO and _REGISTRY[cfg["name"]].samples_k_paths:
        raise UserError(f"strategy.k: {cfg['name']} runs k paths per layer in every step and needs them counted; "
                        f"auto is for strategies that train every path (joint, bilevel)")


def strategy_class(name: str) -> type["Strategy"]:
    check_strategy({**STRATEGY_DEFAULTS, "name": name})
    return _REGISTRY[name]


def create_strategy(cfg: dict, model, train: dict, seed: int, logger, run_dir: str, stage_ends=None,
                    stop: dict | None = None) -> "Strategy":
    """stop: the search's stopping rule (``search.stop``, ``nas.search.stopping``); None: no rule."""
    check_strategy(cfg)
    return _REGISTRY[cfg["name"]](cfg, model, train, seed, logger, run_dir, stage_ends, stop)


class Strategy(Task):
    """The loop's hooks for a search. Subclasses set ``name`` and override what differs.

    Order of the hooks in one training step (``nas.engine.loop``): ``before_step`` (alpha step, path
    sampling), forward + ``loss``, backward, ``before_optimizer_step`` (drop gradients that must not be
    used), ``clip_gradients``, the weights' optimizer step, ``after_step``.

    Compute is counted in path-steps: every training forward (weight steps and bilevel's alpha steps; not the
    evaluation) adds its images times the paths it runs, summed over layers and ranks; the epoch's record
    holds the total so far (``path_steps``). After each epoch the stopping rule (``search.stop``) reads the
    alpha history; rank 0's decision is every rank's.
    """

    name = ""
    needs_heldout = False          # the data must provide a held-out split (``set_heldout``)
    samples_k_paths = False        # each step runs strategy.k paths per layer (so k must be counted, not auto)
    find_unused_parameters = False  # DDP: some parameters get no gradient in a step

    def __init__(self, cfg: dict, model, train: dict, seed: int, logger, run_dir: str, stage_ends=None,
                 stop: dict | None = None):
        self.cfg, self.model, self.train, self.seed = cfg, model, train, seed
        self.stop = stop_settings(stop)
        self.path_steps = 0    # every rank's, up to the last finished epoch
        self._epoch_paths = 0  # this rank's, in the current epoch
        self._stop = None      # the stopping rule after the last finished epoch (a StopState)
        self.logger, self.run_dir, self.stage_ends = logger, run_dir, stage_ends
        self.label_smoothing, self.amp = train["label_smoothing"], train["amp"]
        self.alphas = arch_parameters(model)
        self.history = alpha_report.AlphaHistory(candidates=search_candidates(model))
        if cfg.get("path_dropout"):
            self.find_unused_parameters = True  # a dropped path's parameters get no gradient in that step

    # -- optimizers -------------------------------------------------------------------------------
    def alpha_lr(self) -> float:
        return self.cfg["alpha_lr"] if self.cfg["alpha_lr"] is not None else self.train["lr"]

    def alpha_weight_decay(self) -> float:
        return self.cfg["alpha_weight_decay"] or 0.0

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The weights' AdamW; alpha is its last group ("alpha"), scheduled like the weights."""
        groups = weight_groups(self.model, self.train["lr"], self.train["weight_decay"], exclude=self.alphas)
        groups.append({"params": self.alphas, "weight_decay": self.alpha_weight_decay(), "base_lr": self.alpha_lr(),
                       "name": "alpha"})
        self.optimizer = adamw(groups)
        return self.optimizer

    def alpha_step_lr(self) -> float:
        """The lr alpha's optimizer uses now (the "alpha" group follows the weights' schedule)."""
        return next(g["lr"] for g in self.optimizer.param_groups if g["name"] == "alpha")

    # -- per-step hooks ---------------------------------------------------------------------------
    def alpha_frozen(self, epoch: int) -> bool:
        return epoch < self.cfg["alpha_warmup_epochs"]

    def drop_alpha_grads(self) -> None:
        for a in self.alphas:
            a.grad = None

    def drop_paths(self, step: int) -> None:
        """Path dropout (``path_dropout``) for this step's weight update: each layer keeps each path with
        probability 1 - p, and one path drawn uniformly when it would keep none."""
        p = self.cfg.get("path_dropout")
        if not p:
            return
        gen = torch.Generator().manual_seed(step_seed(self.seed, step))
        paths = []
        for a in self.alphas:
            kept = (torch.rand(a.numel(), generator=gen) >= p).nonzero().view(-1)
            if kept.numel() == 0:
                kept = torch.randint(a.numel(), (1,), generator=gen)
            paths.append(kept)
        set_active_paths(self.model, paths)

    def before_step(self, step: int, epoch: int) -> None:
        self.drop_paths(step)

    def eval_model(self, model):
        set_active_paths(self.model, None)  # evaluation (and the report) runs every path
        return model

    def loss(self, model, images, labels):
        self._epoch_paths += images.shape[0] * sum(len(m.slots()) for m in search_scans(self.model))
        return super().loss(model, images, labels)

    def before_optimizer_step(self, epoch: int) -> None:
        if self.alpha_frozen(epoch):
            self.drop_alpha_grads()

    def step_scalars(self, epoch: int) -> dict:
        return {"step/alpha_lr": 0.0 if self.alpha_frozen(epoch) else self.alpha_step_lr()}

    def clip_gradients(self, max_norm: float) -> None:
        ids = {id(a) for a in self.alphas}
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if id(p) not in ids], max_norm)

    # -- per-epoch report -------------------------------------------------------------------------
    def on_epoch_end(self, epoch: int, record: dict) -> dict:
        probs = alpha_report.layer_probs(self.model)
        self.history.record(epoch + 1, probs)
        if self.logger.enabled:
            self.history.write(f"{self.run_dir}/alphas.json")
        self._stop = self.stop_rule()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        # one reduction: the epoch's path-steps of every rank, and rank 0's stop decision (only rank 0 adds it)
        shared = all_reduce_sum(torch.tensor([float(self._epoch_paths), float(rank == 0 and self._stop.stop)],
                                             dtype=torch.float64))
        self.path_steps += int(shared[0].item())
        self._epoch_paths = 0
        self._stop = dataclasses.replace(self._stop, stop=bool(shared[1].item()))
        return {**alpha_report.report(self.logger, self.model, probs, epoch + 1, self.run_dir, self.cfg["k"],
                                      self.stage_ends, self.cfg["auto_mass"]),
                "path_steps": self.path_steps, "arch_stable_epochs": self._stop.stable,
                "arch_margin_min": min(self._stop.margins)}

    def stop_rule(self):
        """The stopping rule after the last epoch of the history (None before the first)."""
        return stop_state(self.history.epochs, self.stop, self.cfg["k"], self.history.candidates,
                          self.cfg["auto_mass"])

    def end_of_run(self) -> dict | None:
        if self._stop is None or not self._stop.stop:
            return None
        s, stop = self._stop, self.stop
        return {"reason": f"the derived architecture held for {s.stable} epoch(s) (search.stop.patience "
                          f"{stop['patience']}) with every layer's margin >= {stop['min_margin']:g} (smallest "
                          f"{min(s.margins):.4f})",
                "epochs_done": s.epoch, "margins": s.margins, "stable_epochs": s.stable, "path_steps": self.path_steps}

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # a checkpoint inside an epoch holds rank 0's path-steps of it; every rank resumes from that count (the
        # ranks run batches of one size, so it stands for each of them)
        return {"alpha_history": self.history.epochs, "path_steps": self.path_steps,
                "epoch_path_steps": self._epoch_paths}

    def load_state_dict(self, state: dict) -> None:
        self.history = alpha_report.AlphaHistory(state["alpha_history"], self.history.candidates)
        self.path_steps = state.get("path_steps", 0)  # 0: a checkpoint written before compute was counted
        self._epoch_paths = state.get("epoch_path_steps", 0)
        self._stop = self.stop_rule()  # with this run's settings: a larger patience continues a stopped run


@register_strategy
class Joint(Strategy):
    """LocalMamba's search: alpha trains with the weights, on the same batches, by the same AdamW."""

    name = "joint"


@register_strategy
class Bilevel(Strategy):
    """First-order DARTS: before each weight step, alpha takes one Adam step on a held-out batch.

    The alpha gradient is taken with ``torch.autograd.grad`` through the bare model (not the DDP
    wrapper, so no weight gradient is reduced or accumulated) and averaged over ranks by hand; the
    weights' own backward also reaches alpha, and that gradient is dropped before every weight step.
    Logs ``heldout_loss`` / ``heldout_top1``: the running mean over the epoch's alpha steps, each
    measured on its batch before the step.
    """

    name = "bilevel"
    needs_heldout = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha_opt = torch.optim.Adam(self.alphas, lr=self.alpha_lr(), betas=tuple(self.cfg["alpha_betas"]),
                                          weight_decay=self.alpha_weight_decay())
        self.heldout_loader = None
        self._heldout_iter = None
        self._pass, self._taken = 0, 0  # held-out pass of this epoch and batches drawn from it
        self._sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n of the epoch's alpha steps

    def alpha_lr(self) -> float:
        return self.cfg["alpha_lr"] if self.cfg["alpha_lr"] is not None else 3e-4

    def alpha_weight_decay(self) -> float:
        wd = self.cfg["alpha_weight_decay"]
        return wd if wd is not None else 1e-3

    def build_optimizer(self) -> torch.optim.Optimizer:
        return adamw(weight_groups(self.model, self.train["lr"], self.train["weight_decay"], exclude=self.alphas))

    def alpha_step_lr(self) -> float:
        return self.alpha_opt.param_groups[0]["lr"]

    def set_heldout(self, loader) -> None:
        self.heldout_loader = loader

    def _next_heldout(self, epoch: int):
        # Each training epoch starts a fresh pass over the held-out set, seeded by (epoch, pass), so a
        # resumed run draws the same held-out batches as an uninterrupted one.
        while True:
            if self._heldout_iter is None:  # resuming inside a pass starts after the batches drawn before
                set_epoch(self.heldout_loader, heldout_pass_seed(epoch, self._pass), skip_batches=self._taken)
                self._heldout_iter = iter(self.heldout_loader)
            try:
                batch = next(self._heldout_iter)
                self._taken += 1
                return batch
            except StopIteration:
                self._pass, self._taken, self._heldout_iter = self._pass + 1, 0, None

    def before_step(self, step: int, epoch: int) -> None:
        self.drop_paths(step)  # the alpha step and the weight step run the same paths
        self.alpha_step(epoch)

    def alpha_step(self, epoch: int) -> None:
        if self.alpha_frozen(epoch):
            return
        images, labels = self._next_heldout(epoch)
        device = self.alphas[0].device
        images, labels = images.to(device), labels.to(device)
        with autocast(self.amp, device):
            loss, logits = self.loss(self.model, images, labels)
        finite = all_reduce_sum(torch.tensor([float(torch.isfinite(loss).item())]))
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if finite.item() < world:  # every rank skips together; the weight step's check counts bad steps
            return
        grads = torch.autograd.grad(loss, self.alphas)
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / world
        for a, g in zip(self.alphas, flat.split([a.numel() for a in self.alphas])):
            a.grad = g.view_as(a)
        self.alpha_opt.step()
        self.drop_alpha_grads()
        n = labels.shape[0]
        self._sums += torch.tensor([loss.item() * n, topk_correct(logits.detach(), labels, 1), n],
                                   dtype=torch.float64)

    def before_optimizer_step(self, epoch: int) -> None:
        self.drop_alpha_grads()  # the training batch's alpha gradient is not alpha's to use

    def on_epoch_end(self, epoch: int, record: dict) -> dict:
        sums = all_reduce_sum(self._sums.clone())
        self._heldout_iter, self._pass, self._taken = None, 0, 0
        self._sums.zero_()
        out = {}
        if sums[2] > 0:
            out = {"heldout_loss": sums[0].item() / sums[2].item(), "heldout_top1": 100 * sums[1].item() / sums[2].item()}
        return {**out, **super().on_epoch_end(epoch, record)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "alpha_optimizer": self.alpha_opt.state_dict(),
                "heldout_position": {"pass": self._pass, "taken": self._taken, "sums": self._sums.clone()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.alpha_opt.load_state_dict(state["alpha_optimizer"])
        position = state.get("heldout_position")  # absent in checkpoints written at epoch ends before it existed
        if position is not None:
            self._pass, self._taken, self._sums = position["pass"], position["taken"], position["sums"].clone()
        self._heldout_iter = None


def heldout_pass_seed(epoch: int, held_pass: int) -> int:
    """The loader epoch of held-out pass ``held_pass`` in training epoch ``epoch``: distinct for any run
    with fewer than 1000 held-out passes per epoch (a pass per weight step would need 1000 batches)."""
    return epoch * 1000 + held_pass


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s path draw: the same on every rank and after a resume; the prime stride
    keeps (seed, step) pairs of different runs from sharing a draw for any run under a million steps."""
    return seed * 1_000_003 + step


def gumbel_top_k(alpha: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct direction indices drawn without replacement from softmax(alpha), sorted."""
    logits = alpha.detach().float().view(-1).cpu().log_softmax(0)
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-10, 1.0)
    return (logits - torch.log(-torch.log(u))).topk(k).indices.sort().values


@register_strategy
class Sampled(Strategy):
    """Joint training of k sampled directions per layer and step (see the module docstring)."""

    name = "sampled"
    find_unused_parameters = True  # the skipped directions' parameters get no gradient
    samples_k_paths = True

    def before_step(self, step: int, epoch: int) -> None:
        gen = torch.Generator().manual_seed(step_seed(self.seed, step))
        ks = fixed_counts(self.cfg["k"], len(self.alphas), self.alphas[0].numel())  # K: one alpha per candidate
        set_active_paths(self.model, [gumbel_top_k(a, k, gen) for a, k in zip(self.alphas, ks)])

