"""``--calib learned-prompts``: SD-Turbo images from K learned prompt embeddings ("modes") per class
(the data-free calibration of arXiv 2602.18861).

For each class, K text-encoder embeddings [L, D] are initialised from the encoded class prompt
("a photo of a <class>") plus a small seeded perturbation (identical copies would get identical updates),
and optimized with Adam so that the images the one-step sampler (:mod:`vitqc.calib.diffusion`) makes from
them, with fresh latent noise at every step, are classified as the class by the FP model, with

* cross-entropy of the FP model's logits to the class,
* an embedding diversity term: the mean squared cosine similarity between the K modes' offsets from the
  class prompt (0 when the offsets are mutually orthogonal), so the modes move apart,
* a feature diversity term: the same squared-cosine measure on the FP model's pre-logits features of the
  images generated from the K modes, so the modes make different-looking images.

Classes are learned in groups of ``classes_per_step`` (one optimization step updates a whole group: a batch
of ``classes_per_step * modes`` images), which is what makes it faster than learning class by class.
Under ``torchrun`` each rank learns its own classes (see :mod:`vitqc.calib.distributed`) and rank 0 writes
one file. Embeddings are saved as safetensors (``embeddings`` [N, K, L, D] float32, ``classes`` [N]) with
the class names and options in the metadata, and reused: ``--calib learned-prompts:FILE`` loads FILE when it
exists (learning only the classes it lacks) and writes it otherwise; progress is saved after every group
of classes, so an interrupted learning run resumes too.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from vitqc.calib import Source, item_seed
from vitqc.calib.spec import register_source
from vitqc.calib import distributed as dist
from vitqc.calib.classes import prompt_name
from vitqc.calib.diffusion import DiffusionSource, DisagreementOptions
from vitqc.calib.features import forward, normalise
from vitqc.calib.inversion import frozen
from vitqc.errors import VitqcError

FORMAT = "vitqc.learned-prompts/1"
_LEARN_SALT = 0x1EA2


@dataclass
class LearnedPromptOptions(DisagreementOptions):
    modes: int = 4
    steps: int = 100
    lr: float = 5e-3
    classes_per_step: int = 4  # classes per optimization step (batch = classes_per_step * modes images)
    w_ce: float = 1.0
    w_emb: float = 1.0
    w_feat: float = 0.5
    init_noise: float = 0.05  # perturbation std, relative to the class prompt embedding's std
    template: str = "a photo of a {}"
    batch_size: int = 8  # generation batch (images per sampler call)
    resolution: int | None = None  # diffusion output size (default: the UNet's, 512 for SD-Turbo)
    checkpointing: bool | None = None  # gradient checkpointing while learning (default: on a GPU)
    embeddings: str | None = None  # safetensors file to reuse / write
    limits: ClassVar[dict[str, str]] = {**DisagreementOptions.limits, "modes": ">= 1", "steps": ">= 0", "lr": ">= 0", "classes_per_step": ">= 1",
                                        "w_ce": ">= 0", "w_emb": ">= 0", "w_feat": ">= 0", "init_noise": ">= 0",
                                        "batch_size": ">= 1", "resolution": ">= 8"}


def _offdiag_cos(x: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarities [G, K, K] between the K vectors of each group (flattened, minus ``anchor``)."""
    g, k = x.shape[:2]
    v = x.reshape(g, k, -1)
    if anchor is not None:
        v = v - anchor.reshape(g, 1, -1)
    v = F.normalize(v.float(), dim=-1)
    return v @ v.transpose(1, 2)


def pairwise_similarity(x: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine similarity between distinct modes of the same group; ``x`` is [G, K, ...]."""
    k = x.shape[1]
    if k < 2:
        return x.new_zeros(())
    cos = _offdiag_cos(x, anchor)
    mask = ~torch.eye(k, dtype=torch.bool, device=cos.device)
    return cos[:, mask].mean()


def diversity_loss(x: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared cosine similarity between distinct modes of the same group (0 iff mutually orthogonal);
    ``x`` is [G, K, ...], ``anchor`` (optional) [G, ...] is subtracted first."""
    k = x.shape[1]
    if k < 2:
        return x.new_zeros(())
    cos = _offdiag_cos(x, anchor)
    mask = ~torch.eye(k, dtype=torch.bool, device=cos.device)
    return cos[:, mask].pow(2).mean()


@register_source
class LearnedPromptSource(DiffusionSource, Source):
    name = "learned-prompts"
    summary = "SD-Turbo images from prompt embeddings learned per class (needs the SD-Turbo weights)"
    Options = LearnedPromptOptions
    needs_class_names = True

    def __init__(self, model, preprocess, class_names, *, sampler=None, diffusion: str | None = None, **kwargs):
        Source.__init__(self, model, preprocess, class_names, **kwargs)
        self._init_sampler(sampler, diffusion)
        self.embeddings: dict[int, torch.Tensor] = {}  # class -> [K, L, D] float32 (CPU)
        self.history: list[dict] = []

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    # -- learning ----------------------------------------------------------------------------------

    def anchors(self, classes: Sequence[int]) -> torch.Tensor:
        """Encoded class prompts [G, L, D] (float32, on the sampler's device)."""
        template = self.options.template
        return self.sampler.encode_prompts([template.format(prompt_name(self.class_names[c])) for c in classes])

    def initial_embeddings(self, classes: Sequence[int], anchors: torch.Tensor) -> torch.Tensor:
        k = self.options.modes
        out = anchors[:, None].repeat(1, k, 1, 1)
        for g, c in enumerate(classes):
            gen = torch.Generator().manual_seed(item_seed(self.seed ^ _LEARN_SALT, c, -1))
            noise = torch.randn(out.shape[1:], generator=gen).to(out.device)
            out[g] += self.options.init_noise * anchors[g].std() * noise
        return out

    def loss(self, embeds: torch.Tensor, anchors: torch.Tensor, classes: Sequence[int], seeds: Sequence[int]):
        """(total, parts) for embeddings [G, K, L, D] of ``classes``; one image per mode from ``seeds``."""
        o = self.options
        g, k = embeds.shape[:2]
        images = self.render(embeds.reshape(g * k, *embeds.shape[2:]), seeds, grad=True)
        out = forward(self.model, normalise(images, self.preprocess), want_patches=False)
        targets = torch.tensor(list(classes), device=out.logits.device).repeat_interleave(k)
        ce = F.cross_entropy(out.logits.float(), targets)
        emb = diversity_loss(embeds, anchors)
        feat = diversity_loss(out.pooled.float().reshape(g, k, -1))
        total = o.w_ce * ce + o.w_emb * emb + o.w_feat * feat
        acc = (out.logits.argmax(-1) == targets).float().mean()
        return total, {"ce": ce.item(), "emb": emb.item(), "feat": feat.item(), "acc": acc.item()}

    def learn(self, classes: Sequence[int], steps: int | None = None, bar=None,
              on_group=None) -> dict[int, torch.Tensor]:
        """Learn the K modes of ``classes`` (groups of ``classes_per_step``); returns class -> [K, L, D].
        ``on_group(learned_so_far)`` is called after each group (to save progress)."""
        o = self.options
        steps = o.steps if steps is None else steps
        if o.modes < 1:
            raise VitqcError("learned-prompts option modes must be at least 1")
        if o.checkpointing or (o.checkpointing is None and self.sampler.device.type == "cuda"):
            self.sampler.enable_checkpointing()
        learned: dict[int, torch.Tensor] = {}
        started = time.perf_counter()
        with frozen(self.model, self.sampler.device):
            for start in range(0, len(classes), max(1, o.classes_per_step)):
                group = list(classes[start:start + max(1, o.classes_per_step)])
                anchors = self.anchors(group)
                embeds = self.initial_embeddings(group, anchors).requires_grad_(True)
                opt = torch.optim.Adam([embeds], lr=o.lr)
                for step in range(steps):
                    seeds = [item_seed(self.seed ^ _LEARN_SALT, c, step * o.modes + m) for c in group for m in range(o.modes)]
                    with torch.enable_grad():
                        total, parts = self.loss(embeds, anchors, group, seeds)
                        opt.zero_grad(set_to_none=True)
                        total.backward()
                    opt.step()
                    self.history.append({"classes": group, "step": step, "loss": total.item(), **parts})
                    if bar is not None:
                        bar.advance(len(group) / max(steps, 1))
                        bar.update(loss=total.item(), ce=parts["ce"], acc=parts["acc"])
                for g, c in enumerate(group):
                    learned[c] = embeds[g].detach().float().cpu()
                if on_group is not None:
                    on_group(learned)
        seconds = time.perf_counter() - started
        if classes:
            self.stats.update(learn_seconds=round(seconds, 2), learn_classes=len(classes),
                              learn_seconds_per_class=round(seconds / len(classes), 3),
                              learn_images_per_second=round(len(classes) * o.modes * steps / max(seconds, 1e-9), 2))
        return learned

    # -- persistence -------------------------------------------------------------------------------

    def save(self, path: str | Path, embeddings: dict[int, torch.Tensor] | None = None) -> Path:
        """Write ``embeddings`` (default: all learned so far) as safetensors, atomically."""
        from safetensors.torch import save_file

        emb = self.embeddings if embeddings is None else embeddings
        classes = sorted(emb)
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "num_classes": str(self.num_classes), "modes": str(self.options.modes),
                "class_names": json.dumps([self.class_names[c] for c in classes]),
                "options": json.dumps(self.describe()["options"]), "diffusion": json.dumps(self.diffusion_info())}
        tmp = path.with_name(path.name + ".tmp")
        save_file({"embeddings": torch.stack([emb[c] for c in classes]).contiguous(),
                   "classes": torch.tensor(classes, dtype=torch.long)}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    def load(self, path: str | Path) -> dict[int, torch.Tensor]:
        """Read embeddings written by :meth:`save`, checking they were learned for these classes."""
        from safetensors import safe_open

        path = Path(path).expanduser()
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                embeds, classes = f.get_tensor("embeddings"), f.get_tensor("classes")
        except Exception as e:  # noqa: BLE001
            raise VitqcError(f"could not read learned prompt embeddings from {path}: {type(e).__name__}: {e}") from None
        if meta.get("format") != FORMAT:
            raise VitqcError(f"{path} is not a learned-prompts file written by vitqc (format {meta.get('format')!r})")
        if int(meta.get("num_classes", -1)) != self.num_classes:
            raise VitqcError(f"{path} was learned for a model with {meta.get('num_classes')} classes, this one has "
                             f"{self.num_classes}: use another file")
        names = json.loads(meta.get("class_names", "[]"))
        for c, name in zip(classes.tolist(), names):
            if self.class_names[c] != name:
                raise VitqcError(f"{path} was learned for other class names (class {c} is {name!r} there, "
                                 f"{self.class_names[c]!r} here): use another file")
        if embeds.shape[1] != self.options.modes:
            raise VitqcError(f"{path} holds {embeds.shape[1]} modes per class but modes={self.options.modes}: "
                             f"pass --opt modes={embeds.shape[1]} or use another file")
        return {c: embeds[n].float() for n, c in enumerate(classes.tolist())}

    def _partials(self, path: Path) -> list[Path]:
        return sorted(path.parent.glob(f"{path.stem}.rank*.partial{path.suffix}"))

    def prepare(self, classes: Sequence[int]) -> None:
        """Embeddings for ``classes``: from the ``embeddings`` file (and the per-rank partial files an
        interrupted run left beside it), learning the classes they lack. With a file, progress is saved after
        every group of classes (each rank to ``<file>.rank<r>.partial.safetensors``), and at the end rank 0
        merges everything into the file and removes the partial files."""
        path = Path(self.options.embeddings).expanduser() if self.options.embeddings else None
        if path is not None:
            known: dict[int, torch.Tensor] = {}
            for f in ([path] if path.exists() else []) + self._partials(path):
                known.update(self.load(f))
            self.embeddings.update({c: known[c] for c in classes if c in known})
            self.stats["reused_classes"] = sum(c in known for c in classes)
        missing = [c for c in classes if c not in self.embeddings]
        from vitqc.console import progress_bar

        if missing:
            self.sampler  # noqa: B018 - load the diffusion model before the progress bar (errors come first)
        partial = (path.with_name(f"{path.stem}.rank{dist.rank()}.partial{path.suffix}")
                   if path is not None else None)
        save_progress = (lambda learned: self.save(partial, {**self.embeddings, **learned})) if partial is not None else None
        quiet = self.quiet or not dist.is_main()
        with progress_bar("learn prompts", len(missing), unit="classes", quiet=quiet or not missing) as bar:
            learned = self.learn(missing, bar=bar, on_group=save_progress) if missing else {}
        self.embeddings.update(learned)
        if path is not None and (missing or dist.world_size() > 1 or self._partials(path)):
            merged = dist.gather_dict(learned)
            if dist.is_main():
                everything: dict[int, torch.Tensor] = {}
                for f in ([path] if path.exists() else []) + self._partials(path):
                    everything.update(self.load(f))
                everything.update(merged or {})
                self.save(path, everything)
                for f in self._partials(path):
                    f.unlink()
            dist.barrier()
        if missing:
            first = [h for h in self.history if h["step"] == 0]
            last = [h for h in self.history if h["step"] == max(h["step"] for h in self.history)]
            mean = lambda rows, key: round(sum(r[key] for r in rows) / len(rows), 4)  # noqa: E731
            self.stats.update(loss_first=mean(first, "loss"), loss_last=mean(last, "loss"),
                              acc_first=mean(first, "acc"), acc_last=mean(last, "acc"))

    # -- generation --------------------------------------------------------------------------------

    def item_embeddings(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Mode ``index % modes`` of each item's class (learning classes not prepared yet)."""
        missing = sorted({c for c in labels.tolist() if c not in self.embeddings})
        if missing:  # not prepared (no collectives here: prepare() is what ranks call together)
            self.embeddings.update(self.learn(missing))
        k = self.options.modes
        embeds = torch.stack([self.embeddings[c][i % k] for c, i in zip(labels.tolist(), indices.tolist())])
        if embeds.shape[-1] != self.sampler.embed_dim or embeds.shape[-2] != self.sampler.max_length:
            raise VitqcError(f"learned embeddings are {tuple(embeds.shape[-2:])} but the diffusion model's text "
                             f"encoder gives ({self.sampler.max_length}, {self.sampler.embed_dim}): they were learned "
                             f"with another diffusion model")
        return embeds

    def describe(self) -> dict:
        return {**super().describe(), **self.diffusion_info()}
