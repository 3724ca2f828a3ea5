"""Model registry: every architecture the sweeps can name, wrapped so explainers find what they need.

Each model is a :class:`Classifier` that splits into ``features`` (the last convolutional feature
map A, what GradCAM explains) and ``head`` (A -> logits). ``forward(x, with_features=True)``
returns both from one pass, so a DDP-wrapped student computes its explanation through DDP's own
forward (DDP only synchronises gradients of graphs built inside its forward).

When the head is exactly global-average-pool + linear, ``cam_linear`` points at that linear layer
and GradCAM becomes the analytic CAM (no double backward). B-cos models set ``is_bcos`` and
expose ``explanation_mode()``.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torchvision
from torch import Tensor, nn


class Classifier(nn.Module):
    """features(x) -> A, head(A) -> logits. Subclasses wrap an existing network as ``self.net``."""

    is_bcos: bool = False
    # Name of the input encoding this model expects ("rgb" normalised, or "bcos6" = [x, 1-x]).
    input_encoding: str = "rgb"

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def cam_linear(self) -> nn.Linear | None:
        """The linear layer of a GAP+linear head, or None when the head is anything else."""
        return None

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, a: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, with_features: bool = False):
        a = self.features(x)
        logits = self.head(a)
        return (logits, a) if with_features else logits

    @contextlib.contextmanager
    def explanation_mode(self) -> Iterator[None]:
        """No-op for standard models; B-cos models detach their dynamic factors inside it."""
        yield


class _GapLinearHead(Classifier):
    """Shared head for nets that end in global-average-pool + one linear layer at ``fc_name``."""

    fc_name = "fc"

    @property
    def cam_linear(self) -> nn.Linear:
        return getattr(self.net, self.fc_name)

    def head(self, a: Tensor) -> Tensor:
        return self.cam_linear(a.mean(dim=(2, 3)))


class TVResNet(_GapLinearHead):
    def features(self, x: Tensor) -> Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))


class TVShuffleNet(_GapLinearHead):
    def features(self, x: Tensor) -> Tensor:
        n = self.net
        x = n.maxpool(n.conv1(x))
        return n.conv5(n.stage4(n.stage3(n.stage2(x))))


class TVFeaturesClassifier(Classifier):
    """torchvision nets laid out as ``features`` -> ``avgpool`` -> ``classifier`` (MobileNetV3,
    EfficientNet, ConvNeXt). Their heads hold an MLP, dropout or LayerNorm after pooling, so
    GradCAM takes the general autograd route."""

    def features(self, x: Tensor) -> Tensor:
        return self.net.features(x)

    def head(self, a: Tensor) -> Tensor:
        return self.net.classifier(torch.flatten(self.net.avgpool(a), 1))


class TVConvNeXt(TVFeaturesClassifier):
    def head(self, a: Tensor) -> Tensor:
        # ConvNeXt's classifier starts with LayerNorm2d, which wants the pooled [B, C, 1, 1] map.
        return self.net.classifier(self.net.avgpool(a))


class SmallCNN(_GapLinearHead):
    """A ResNet-flavoured CNN for 32x32 inputs (the laptop default). Feature map: 8x8."""

    def __init__(self, num_classes: int, width: int = 32, in_channels: int = 3):
        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

        net = nn.Module()
        net.body = nn.Sequential(block(in_channels, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 2))
        net.fc = nn.Linear(4 * width, num_classes)
        super().__init__(net)

    def features(self, x: Tensor) -> Tensor:
        return self.net.body(x)


class TinyMobileNet(_GapLinearHead):
    """A MobileNetV2-style student for 32x32 inputs, built from torchvision's own InvertedResidual
    blocks (depthwise-separable convolutions, linear bottlenecks): a second architecture family for
    the laptop experiments (the paper distils into MobileNet/ShuffleNet students too). GAP+linear
    head, so GradCAM stays analytic. Feature map: 8x8."""

    def __init__(self, num_classes: int, width: int = 16, in_channels: int = 3):
        from torchvision.models.mobilenetv2 import InvertedResidual
        from torchvision.ops.misc import Conv2dNormActivation

        net = nn.Module()
        net.body = nn.Sequential(
            Conv2dNormActivation(in_channels, width, 3, 1, activation_layer=nn.ReLU6),
            InvertedResidual(width, int(1.5 * width), 2, 4),                # 16x16
            InvertedResidual(int(1.5 * width), int(1.5 * width), 1, 4),
            InvertedResidual(int(1.5 * width), 3 * width, 2, 4),            # 8x8
            InvertedResidual(3 * width, 3 * width, 1, 4),
            Conv2dNormActivation(3 * width, 6 * width, 1, activation_layer=nn.ReLU6),
        )
        net.fc = nn.Linear(6 * width, num_classes)
        super().__init__(net)

    def features(self, x: Tensor) -> Tensor:
        return self.net.body(x)


# --------------------------------------------------------------------------------------------
# B-cos models (package `bcos`): dynamic-linear, explained by W(x) = d logit / d input inside
# explanation_mode(). Their input is 6 channels [x, 1-x] with x in [0, 1].
# --------------------------------------------------------------------------------------------


class BcosClassifier(Classifier):
    is_bcos = True
    input_encoding = "bcos6"

    def forward(self, x: Tensor, with_features: bool = False):
        logits = self.net(x)
        # B-cos explanations are input gradients; the "features" a caller may ask for are the logits'
        # input, which is x itself. Returning it keeps one forward signature for every model.
        return (logits, x) if with_features else logits

    def features(self, x: Tensor) -> Tensor:
        return x

    def head(self, a: Tensor) -> Tensor:
        return self.net(a)

    @contextlib.contextmanager
    def explanation_mode(self) -> Iterator[None]:
        with self.net.explanation_mode():
            yield


def bcos_logit_bias(num_classes: int) -> float:
    """The B-cos logit bias for ``num_classes`` outputs: -log(C - 1).

    B-cos networks are trained with per-class sigmoids (binary cross-entropy; bcos' ImageNet recipe,
    its experiment configs set ``logit_bias=-math.log(NUM_CLASSES - 1)`` from the dataset's class
    count). The bias makes an input with no evidence (W(x)ᵀx = 0) give sigmoid(b) = 1/C per class:
    the uniform prior. The same derivation is exactly the multi-label case, so 20-class PASCAL VOC
    (sigmoid outputs, F1 at logit 0) gets -log 19 like any 20-class model, and softmax tasks get
    the same value (a constant shift of every logit, which softmax and the KD loss ignore).

    Caveat for imported weights: the guided VOC teacher of the paper comes from the model-guidance
    code (Rao et al. 2023), which loads the ImageNet B-cos ResNet-50 and swaps only its ``fc`` for a
    20-class layer, keeping the ImageNet LogitBias(-log 999) module; the bias is a constant, not in
    the state dict, so such a teacher reproduces its own logits only when built with -log 999."""
    return -math.log(num_classes - 1)


def _bcos_net(builder_path: str, num_classes: int) -> nn.Module:
    import importlib

    module_name, fn_name = builder_path.rsplit(".", 1)
    fn = getattr(importlib.import_module(module_name), fn_name)
    # pretrained=False: nothing is ever downloaded; weights come from a local file (load_weights).
    net = fn(pretrained=False, num_classes=num_classes)
    # The bcos builders take the bias from their ImageNet experiment config (-log 999) whatever
    # num_classes is, so a 20-class model would keep ImageNet's prior. It lives in a LogitLayer
    # (CNNs: ``net.logit_layer``; ViTs: the last module of a BcosSequential, and their builders
    # take no logit_bias argument), so it is set on the module itself.
    from bcos.modules.logitlayer import LogitLayer

    layers = [m for m in net.modules() if isinstance(m, LogitLayer)]
    if len(layers) != 1:
        raise RuntimeError(f"{builder_path}: expected one LogitLayer, found {len(layers)}")
    layers[0].logit_bias = bcos_logit_bias(num_classes)
    return net


class SmallBcosCNN(BcosClassifier):
    """A small B-cos CNN for 32x32 inputs, built from the bcos package's own modules."""

    def __init__(self, num_classes: int, width: int = 32):
        from bcos.common import BcosUtilMixin
        from bcos.modules import BcosConv2d, norms

        class _Net(BcosUtilMixin, nn.Module):
            def __init__(self) -> None:
                super().__init__()
                layers: list[nn.Module] = []
                cin = 6
                for cout, stride in [(width, 1), (width, 1), (2 * width, 2), (2 * width, 1), (4 * width, 2), (4 * width, 1)]:
                    layers += [BcosConv2d(cin, cout, 3, stride=stride, padding=1, b=2),
                               norms.NoBias(norms.BatchNormUncentered2d)(cout)]
                    cin = cout
                layers += [BcosConv2d(cin, num_classes, 1, b=2)]
                self.body = nn.Sequential(*layers)
                self.logit_bias = nn.Parameter(torch.tensor(bcos_logit_bias(num_classes)))

            def forward(self, x: Tensor) -> Tensor:
                # Pool the class maps: the logit is the spatial mean of a dynamic-linear map, so
                # sum(W(x) * x) + bias == logit holds exactly.
                return self.body(x).mean(dim=(2, 3)) + self.logit_bias

        super().__init__(_Net())


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[[int], Classifier]
    input_size: int  # the resolution the architecture is meant for (224 ImageNet, 32 laptop)


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, input_size: int = 224):
    def deco(fn: Callable[[int], Classifier]) -> Callable[[int], Classifier]:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = ModelEntry(fn, input_size)
        return fn

    return deco


def _tv(cls: type[Classifier], tv_name: str) -> Callable[[int], Classifier]:
    return lambda num_classes: cls(getattr(torchvision.models, tv_name)(weights=None, num_classes=num_classes))


for _name in ["resnet18", "resnet34", "resnet50"]:
    register_model(_name)(_tv(TVResNet, _name))
register_model("shufflenet_v2_x1_0")(_tv(TVShuffleNet, "shufflenet_v2_x1_0"))
for _name in ["mobilenet_v3_small", "efficientnet_b0"]:
    register_model(_name)(_tv(TVFeaturesClassifier, _name))
register_model("convnext_tiny")(_tv(TVConvNeXt, "convnext_tiny"))

_BCOS_BUILDERS = {
    "bcos_resnet18": "bcos.models.pretrained.resnet18",
    "bcos_resnet34": "bcos.models.pretrained.resnet34",
    "bcos_resnet50": "bcos.models.pretrained.resnet50",
    "bcos_densenet169": "bcos.models.pretrained.densenet169",
    "bcos_vit_tiny": "bcos.models.pretrained.simple_vit_ti_patch16_224",
}
for _name, _path in _BCOS_BUILDERS.items():
    register_model(_name)(lambda num_classes, _p=_path: BcosClassifier(_bcos_net(_p, num_classes)))

register_model("small_cnn", input_size=32)(lambda num_classes: SmallCNN(num_classes))
# A quarter of small_cnn's compute: the laptop default student (teacher small_cnn -> student tiny_cnn
# mirrors the paper's larger-teacher -> smaller-student setups).
register_model("tiny_cnn", input_size=32)(lambda num_classes: SmallCNN(num_classes, width=16))
# A second student family of similar size (depthwise-separable, residual): the architecture claim.
register_model("tiny_mobilenet", input_size=32)(lambda num_classes: TinyMobileNet(num_classes))
register_model("small_bcos_cnn", input_size=32)(lambda num_classes: SmallBcosCNN(num_classes))


def build_model(name: str, num_classes: int, weights: str | os.PathLike | None = None) -> Classifier:
    """Build a registered architecture; ``weights`` is a local checkpoint (never downloaded)."""
    if name not in MODELS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(MODELS))}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    model = MODELS[name].build(num_classes)
    if weights is not None:
        load_weights(model, weights, arch=name)
    return model


def _read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"weights file {path}: reading .safetensors needs the safetensors package "
                             "(pip install safetensors), or convert it to a torch .pt file") from None
        try:
            return load_file(path)
        except Exception as e:  # a truncated or foreign file
            raise ValueError(f"cannot read weights file {path}: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated/corrupt file or a pickle that is not plain tensors
        raise ValueError(f"cannot read weights file {path}: {e}") from e
    # Accept a bare state dict, our checkpoint layout ({"model": sd, ...}) and common wrappers.
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def load_weights(model: Classifier, path: str | os.PathLike, arch: str = "?") -> None:
    """Load a local checkpoint into ``model``: our own keys (``net.*``) or the raw keys of the
    torchvision/bcos network. Any mismatch raises one message naming the file and the keys."""
    sd = _read_state_dict(path)
    target = model if any(k.startswith("net.") for k in sd) else model.net
    own = target.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong_shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in own.keys() & sd.keys() if tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        if wrong_shape:
            parts.append("shape mismatch: " + "; ".join(wrong_shape[:3]))
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        raise ValueError(f"weights file {os.fspath(path)} does not fit architecture {arch!r}: " + ", ".join(parts))
    target.load_state_dict(sd)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unwrap(model: nn.Module) -> Classifier:
    """The Classifier inside a DDP/compile wrapper."""
    while not isinstance(model, Classifier):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a trainables Classifier, got {type(model).__name__}")
        model = inner
    return model
