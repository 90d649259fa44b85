"""Training math shared by the in-process trainer and the cluster: schedule, optimizer groups, the step's chunking.

One global step = `batch_size` sequences split into `router_workers x micro_batches` equal chunks; each chunk's
loss is scaled by 1/chunks before backward, so summing gradients over chunks (and over workers) gives the
gradient of the mean loss. The in-process trainer uses the same chunking, which makes it the exact oracle for the
cluster (the Switch aux loss depends on which tokens share a batch, so the chunks must match too).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from moe_runtime.adamw import AdamW
from moe_runtime.config import RuntimeConfig, TrainConfig
from moe_runtime.data import BatchLoader, val_batches
from moe_runtime.data_files import DocumentBatch, load_training_corpus
from moe_runtime.model.routing import static_actor_nodes
from moe_runtime.model.transformer import MoETransformer, build_model
from moe_runtime.model.weight_storage import check_trainable
from moe_runtime.placement import Placement


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine to cfg.min_lr at cfg.steps (the Yuan recipe's shape)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on matrices (dim >= 2), none on norms and biases."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(named_params: Iterable[tuple[str, nn.Parameter]], cfg: TrainConfig) -> AdamW:
    """torch.optim.AdamW(groups, lr, betas, eps=1e-8, foreach=False), bit for bit, without importing torch._dynamo
    (moe_runtime/adamw.py)."""
    return AdamW(param_groups(named_params, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=1e-8)


def set_lr(opt: AdamW | torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor, as a pure function so distributed parts can agree on it."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def chunk_rows(batch_size: int, chunks: int) -> list[slice]:
    per = batch_size // chunks
    return [slice(i * per, (i + 1) * per) for i in range(chunks)]


def document_kwargs(docs: DocumentBatch | None, rows: slice | None = None) -> dict[str, torch.Tensor | None]:
    """MoETransformer.forward / loss keyword arguments of a batch's documents (of `rows`); {} without any."""
    if docs is None:
        return {}
    if rows is not None:
        docs = docs.rows(rows)
    return {"documents_bs": docs.documents_bs, "positions_bs": docs.positions_bs}


@dataclass
class TrainResult:
    losses: list[float]
    val_loss: float
    tokens_per_s: float
    router: str
    expert_load: list[list[int]]  # [L][E] token copies per expert, summed over the run
    aux_losses: list[float] = field(default_factory=list)
    step_times_s: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d.update(d.pop("extra"))
        return json.dumps(d)


ProgressFn = Callable[[int, float], None]


class InProcessTrainer:
    """Single-process training with in-process experts: the numerical oracle for the cluster."""

    def __init__(self, cfg: RuntimeConfig):
        check_trainable(cfg.model)  # fp32 master weights (model.expert_weight_dtype)
        self.cfg = cfg
        self.corpus = load_training_corpus(cfg.data, cfg.model)
        t = cfg.train
        self.loader = BatchLoader(self.corpus, t.batch_size, t.seq_len, seed=t.seed)
        self.model: MoETransformer = build_model(cfg.model, seed=t.seed)
        # node-limited routing: the cluster's layout with actors on nodes in contiguous blocks (set_expert_nodes
        # replaces it, e.g. with a live cluster's placement)
        c, m = cfg.cluster, cfg.model
        self.model.set_expert_nodes(Placement.contiguous(m.num_layers, m.num_experts, c.expert_actors,
                                                         static_actor_nodes(c.expert_actors, c.num_nodes)))
        self.opt = make_adamw(self.model.named_parameters(), t)
        self.chunks = chunk_rows(t.batch_size, cfg.cluster.router_workers * t.micro_batches)

    def train_step(self, step: int) -> tuple[float, float, torch.Tensor]:
        """One optimizer step. Returns (lm loss, aux loss, expert load [L, E])."""
        t = self.cfg.train
        self.model.train()
        inputs, targets = self.loader.batch(step)
        docs = self.corpus.documents(inputs)  # None for the stdlib corpus
        self.opt.zero_grad(set_to_none=True)
        lm_total, aux_total = 0.0, 0.0
        load = torch.zeros(self.cfg.model.num_layers, self.cfg.model.num_experts, dtype=torch.long)
        for rows in self.chunks:
            loss, ce = self.model.loss(inputs[rows], targets[rows], **document_kwargs(docs, rows))
            (loss / len(self.chunks)).backward()
            lm_total += ce.item() / len(self.chunks)
            aux_total += (loss - ce).item() / len(self.chunks)
            load += self.model.expert_load()
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        coef = clip_coefficient(float(norm), t.grad_clip)
        if coef < 1.0:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        set_lr(self.opt, lr_at(step, t))
        self.opt.step()
        return lm_total, aux_total, load

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        t = self.cfg.train
        batches = val_batches(self.corpus, t.val_batches, t.batch_size, t.seq_len)
        losses = [self.model.loss(x, y, **document_kwargs(self.corpus.documents(x)))[1].item() for x, y in batches]
        return sum(losses) / len(losses)

    def run(self, steps: int, progress: ProgressFn | None = None) -> TrainResult:
        losses, auxes, times = [], [], []
        load_sum = torch.zeros(self.cfg.model.num_layers, self.cfg.model.num_experts, dtype=torch.long)
        for step in range(steps):
            t0 = time.perf_counter()
            lm, aux, load = self.train_step(step)
            times.append(time.perf_counter() - t0)
            losses.append(lm)
            auxes.append(aux)
            load_sum += load
            if progress:
                progress(step, lm)
        tokens = steps * self.cfg.train.batch_size * self.cfg.train.seq_len
        return TrainResult(
            losses=losses,
            val_loss=self.evaluate(),
            tokens_per_s=tokens / max(sum(times), 1e-9),
            router=self.cfg.model.router,
            expert_load=load_sum.tolist(),
            aux_losses=auxes,
            step_times_s=times,
        )
