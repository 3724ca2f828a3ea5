"""Teachers: train one on the clean data, save it with a model card, load it back verified.

``train_teacher`` writes ``teacher.pt`` (a plain state dict: ``load_weights`` /
``torch.load(weights_only=True)`` read it) and ``teacher.json`` (the :class:`ModelCard`, which
holds the sha256 of teacher.pt). Both are written atomically (temp file + os.replace; on an
object store one PUT each), weights first, so a card never points at weights that are not fully
written. ``load_teacher`` refuses weights whose checksum differs from the card.

A teacher path is a local directory (or its teacher.pt) or a store URI (``s3://bucket/teachers/x``,
see :mod:`trainables.storage`): a store teacher is downloaded once per node, into a local directory
keyed by its weights' sha256, and verified like a local one.

The teacher trains on ``family.teacher_config(data)``: the full training split (``shots`` ignored)
of the *clean* data — decoy-digits teachers train on plain digits, so they never see the shortcut.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from trainables import storage
from trainables.data import DataConfig, build_dataset, dataset_info
from trainables.data.base import family
from trainables.explainers import explain
from trainables.models import Classifier, build_model, file_sha256, load_weights

WEIGHTS_FILE = "teacher.pt"
CARD_FILE = "teacher.json"


@dataclass(frozen=True)
class ModelCard:
    arch: str
    num_classes: int
    encoding: str  # input encoding the teacher expects ("rgb" / "bcos6")
    image_size: int
    data_name: str  # dataset the teacher was asked for (e.g. decoy-digits)
    teacher_data: str  # dataset it actually trained on (e.g. digits)
    data_fingerprint: str  # dataset_info(teacher data).fingerprint
    data_config: dict
    test_accuracy: float | None  # top-1 (multi-label: the top-1 class is present)
    val_accuracy: float | None
    eval_split: str
    epochs: int
    lr: float
    batch_size: int
    seed: int
    train_samples: int
    train_seconds: float
    sha256: str  # of teacher.pt
    weights_file: str = WEIGHTS_FILE
    created: str = ""
    torch_version: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: DataLoader, multilabel: bool = False) -> float:
    """Top-1 accuracy; multi-label: fraction of samples whose top-1 class is present."""
    model.eval()
    correct = total = 0
    for batch in loader:
        pred = model(batch["image"]).argmax(1)
        y = batch["label"]
        hit = y.gather(1, pred[:, None])[:, 0] > 0 if multilabel else pred == y
        correct += int(hit.sum())
        total += len(pred)
    return correct / max(total, 1)


def train_teacher(arch: str, data: DataConfig, out_dir: str | os.PathLike, epochs: int = 15,
                  lr: float = 2e-3, batch_size: int = 64, seed: int = 0,
                  progress: Callable[[str], None] | None = print, max_train_samples: int | None = None,
                  weight_decay: float = 1e-4) -> ModelCard:
    """Train ``arch`` on the clean training split of ``data`` and write teacher.pt + teacher.json.

    AdamW (no weight decay for B-cos models), cosine schedule with a 1-epoch warm-up, the
    dataset's train augmentation. ``max_train_samples`` trains on a seeded random subset (smoke
    tests). Returns the model card.
    """
    progress = progress or (lambda s: None)
    out_dir = os.fspath(out_dir)
    if not storage.is_uri(out_dir):  # fail on an unwritable directory before training, not after
        os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    tdata = family(data).teacher_config(data)
    info = dataset_info(tdata)
    model = build_model(arch, info.num_classes)
    enc = model.input_encoding
    train_ds = build_dataset(tdata, info.train_split, encoding=enc, train=True)
    if max_train_samples is not None and max_train_samples < len(train_ds):
        g = torch.Generator().manual_seed(seed)
        train_ds = Subset(train_ds, torch.randperm(len(train_ds), generator=g)[:max_train_samples].tolist())
    eval_split = "test" if "test" in info.splits else info.eval_splits[-1]
    eval_loader = DataLoader(build_dataset(tdata, eval_split, encoding=enc), batch_size=256)
    val_loader = None
    if info.val_split in info.splits and info.val_split != eval_split:
        val_loader = DataLoader(build_dataset(tdata, info.val_split, encoding=enc), batch_size=256)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=len(train_ds) > batch_size,
                        generator=torch.Generator().manual_seed(seed))

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0 if model.is_bcos else weight_decay)
    total = max(1, epochs * len(loader))
    warm = min(len(loader), total // 2)
    def lr_factor(s: int) -> float:
        if s < warm:
            return (s + 1) / max(warm, 1)
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    loss_fn: Callable[[Tensor, Tensor], Tensor] = (
        (lambda z, y: F.binary_cross_entropy_with_logits(z, y)) if info.multilabel else F.cross_entropy)

    t0, c0 = time.perf_counter(), time.process_time()
    progress(f"teacher {arch} on {tdata.name} ({len(train_ds)} train images, {enc}), {epochs} epochs")
    val_acc = None
    for epoch in range(1, epochs + 1):
        model.train()
        run_loss = n = 0.0
        for batch in loader:
            z = model(batch["image"])
            loss = loss_fn(z, batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            run_loss += float(loss.detach()) * len(z)
            n += len(z)
        msg = f"epoch {epoch}/{epochs} loss {run_loss / max(n, 1):.4f}"
        if val_loader is not None:
            val_acc = evaluate_accuracy(model, val_loader, info.multilabel)
            msg += f" val_acc {val_acc:.4f}"
        progress(msg + f" ({time.perf_counter() - t0:.1f}s)")
    test_acc = evaluate_accuracy(model, eval_loader, info.multilabel)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    progress(f"{eval_split} accuracy {test_acc:.4f} after {seconds:.1f}s wall, {cpu:.1f}s CPU "
             f"({torch.get_num_threads()} threads)")

    return save_teacher(model, arch, data, out_dir, test_accuracy=test_acc, val_accuracy=val_acc,
                        eval_split=eval_split, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                        train_samples=len(train_ds), train_seconds=round(seconds, 2),
                        extra={"cpu_seconds": round(cpu, 1), "threads": torch.get_num_threads()})


def save_teacher(model: Classifier, arch: str, data: DataConfig, out_dir: str | os.PathLike,
                 **card_fields) -> ModelCard:
    """Write ``model`` as a teacher (teacher.pt, then teacher.json), atomically, to a local
    directory or a store URI. ``card_fields`` fill the training-related card fields (defaults
    describe an untrained model)."""
    out_dir = storage.normalize(out_dir)
    tdata = family(data).teacher_config(data)
    info = dataset_info(tdata)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buf = io.BytesIO()  # serialise once: the checksum and the upload are of the same bytes
    torch.save(state, buf)
    blob = buf.getvalue()
    storage.write_bytes(storage.join(out_dir, WEIGHTS_FILE), blob)
    defaults = dict(test_accuracy=None, val_accuracy=None, eval_split="", epochs=0, lr=0.0, batch_size=0,
                    seed=0, train_samples=0, train_seconds=0.0)
    card = ModelCard(
        arch=arch, num_classes=info.num_classes, encoding=model.input_encoding, image_size=tdata.image_size,
        data_name=data.name, teacher_data=tdata.name, data_fingerprint=info.fingerprint,
        data_config=tdata.to_dict(), sha256=hashlib.sha256(blob).hexdigest(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), torch_version=torch.__version__,
        **{**defaults, **card_fields})
    storage.write_bytes(storage.join(out_dir, CARD_FILE), card.to_json().encode())  # last: makes it valid
    return card


def teacher_paths(path: str | os.PathLike) -> tuple[str, str]:
    """(weights, card) for a teacher directory or a weights file (card = teacher.json beside it),
    local paths or store URIs."""
    path = os.fspath(path)
    if storage.is_uri(path):
        path = storage.normalize(path)
        if path.endswith(".pt"):
            return path, storage.join(storage.parent_and_name(path)[0], CARD_FILE)
        return storage.join(path, WEIGHTS_FILE), storage.join(path, CARD_FILE)
    if os.path.isdir(path):
        return os.path.join(path, WEIGHTS_FILE), os.path.join(path, CARD_FILE)
    return path, os.path.join(os.path.dirname(os.path.abspath(path)), CARD_FILE)


def teacher_exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds teacher weights (a local check or one store request)."""
    return storage.is_file(teacher_paths(path)[0])


def read_card(path: str | os.PathLike) -> ModelCard:
    _, card_path = teacher_paths(path)
    try:
        text = storage.read_bytes(card_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"teacher model card not found: {card_path}") from None
    try:
        return ModelCard.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # not JSON, or not a card
        raise ValueError(f"teacher model card {card_path} is not a valid card ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None


def load_teacher(path: str | os.PathLike) -> tuple[Classifier, ModelCard]:
    """Load a teacher directory (or its teacher.pt), local or a store URI, in eval mode, after
    checking the weights' sha256 against the model card. Raises ValueError naming the file on
    mismatch. A store teacher is downloaded once per node (:func:`trainables.storage.local_copy`)."""
    weights, card_path = teacher_paths(path)
    if not storage.is_file(weights):
        raise FileNotFoundError(f"teacher weights not found: {weights} (expected a directory holding "
                                f"{WEIGHTS_FILE} + {CARD_FILE}, or the {WEIGHTS_FILE} file itself)")
    card = read_card(path)
    if storage.is_uri(weights):
        parent, name = storage.parent_and_name(weights)
        local = storage.local_copy(parent, card.sha256, {name: card.sha256}, kind="teachers")
        actual = file_sha256(os.path.join(local, name))
        weights_file = os.path.join(local, name)
    else:
        weights_file = weights
        actual = file_sha256(weights)
    if actual != card.sha256:
        raise ValueError(f"teacher weights {weights} fail their checksum: sha256 {actual} but {card_path} "
                         f"records {card.sha256} (file modified or corrupt)")
    model = build_model(card.arch, card.num_classes)
    load_weights(model, weights_file, arch=card.arch)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, card


def teacher_outputs(model: nn.Module, x: Tensor, explainer: str) -> tuple[Tensor, Tensor]:
    """Teacher logits and explanation (top-1 class) at the explainer's native resolution,
    no autograd graph kept (``create_graph=False``)."""
    e = explain(model, x, target=None, method=explainer, create_graph=False, resize=False)
    return e.logits.detach().float(), e.maps.detach().float()


# ------------------------------------ teacher cache (frozen explanations) -------------------


class TeacherRunner:
    """Runs a verified teacher over the distillation split, batch of positions in, cache rows out.
    Built from paths and configs only, so a Ray Data actor can construct it.

    The teacher sees each *full image* resized to image_size x image_size (``view="full"``), so its
    map covers the whole image and every training crop box can be cut from it (see
    ``trainables.data.cache``). Training crops of the live path are distorted by up to their
    aspect-ratio range (3/4..4/3) too, so the squashed full view stays within what the teacher sees
    live; a fixed square is what lets the cache batch the teacher and keep one map shape.

    ``max_map_side``: maps whose side exceeds it are stored area-downsampled (B-cos W(x) at 224 px
    -> 56 with 56); None (the default) stores them at full resolution, the paper's frozen maps.
    GradCAM maps (7x7 / 8x8) are always stored native.
    """

    def __init__(self, teacher_dir: str | os.PathLike, data: DataConfig, explainer: str,
                 max_map_side: int | None = None, split: str | None = None, device: str = "cpu"):
        from trainables.explainers import check_compatible

        self.model, self.card = load_teacher(teacher_dir)
        check_compatible(self.model, explainer)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.info = dataset_info(data)
        if self.info.num_classes != self.card.num_classes:
            raise ValueError(f"teacher {teacher_dir} has {self.card.num_classes} classes, data {data.name!r} has "
                             f"{self.info.num_classes}")
        self.data, self.explainer, self.max_map_side = data, explainer, max_map_side
        self.split = split or self.info.train_split
        self.dataset = build_dataset(data, self.split, encoding=self.card.encoding, train=False, view="full")

    def __len__(self) -> int:
        return len(self.dataset)

    def run(self, positions) -> dict:
        """{"index": int64 [B], "logits": float32 [B,C], "map": float32 [B,*stored_shape]}."""
        from trainables.data.cache import shrink_maps

        items = [self.dataset[int(p)] for p in positions]
        x = torch.stack([it["image"] for it in items]).to(self.device)
        logits, maps = teacher_outputs(self.model, x, self.explainer)
        maps = shrink_maps(maps, self.max_map_side)
        return {"index": torch.tensor([it["index"] for it in items], dtype=torch.int64).numpy(),
                "logits": logits.cpu().numpy(), "map": maps.cpu().numpy()}

    def native_map_shape(self) -> tuple[int, ...]:
        x = self.dataset[0]["image"][None].to(self.device)
        return tuple(teacher_outputs(self.model, x, self.explainer)[1].shape[1:])

    def meta(self) -> tuple[dict, tuple[int, ...]]:
        """(manifest fields, stored map shape)."""
        from trainables.data.base import family as _family
        from trainables.data.cache import stored_map_shape

        native = self.native_map_shape()
        stored = stored_map_shape(native, self.max_map_side)
        meta = {
            "teacher_sha256": self.card.sha256, "teacher_arch": self.card.arch,
            "teacher_data_fingerprint": self.card.data_fingerprint, "explainer": self.explainer,
            "encoding": self.card.encoding, "dataset": self.data.name, "split": self.split,
            "fingerprint": self.info.fingerprint, "data_config": self.data.to_dict(),
            "transform": (_family(self.data).describe_view(self.data) + f"; teacher view: the full image resized "
                          f"to {self.data.image_size}x{self.data.image_size}; encoding {self.card.encoding}"),
            "image_size": self.data.image_size, "native_map_shape": list(native),
            "map_resize": "none" if stored == native else f"area {list(native)} -> {list(stored)}",
            "target": "teacher top-1 class",
        }
        return meta, stored


def build_cache_local(teacher_dir: str | os.PathLike, data: DataConfig, explainer: str, out_dir: str | os.PathLike,
                      batch_size: int = 64, max_map_side: int | None = None, overwrite: bool = False,
                      rows_per_shard: int = 8192, progress: Callable[[str], None] | None = None) -> dict:
    """In-process cache build (tests, small data, benchmarks); orchestrator.cache_job.build_cache
    is the Ray Data version. Returns the manifest."""
    from trainables.data.cache import CacheWriter

    runner = TeacherRunner(teacher_dir, data, explainer, max_map_side)
    meta, shape = runner.meta()
    n = len(runner)
    with CacheWriter(out_dir, meta, runner.card.num_classes, shape, rows_per_shard=rows_per_shard,
                     expect_rows=n, overwrite=overwrite) as w:
        for start in range(0, n, batch_size):
            out = runner.run(range(start, min(n, start + batch_size)))
            w.add(out["index"], out["logits"], out["map"])
            if progress:
                progress(f"cache {min(n, start + batch_size)}/{n}")
        return w.close()


__all__ = ["ModelCard", "TeacherRunner", "build_cache_local", "save_teacher", "train_teacher", "load_teacher",
           "read_card", "teacher_exists", "teacher_paths", "teacher_outputs",
           "evaluate_accuracy", "WEIGHTS_FILE", "CARD_FILE"]
