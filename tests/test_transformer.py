"""fastnn.patch on torch's own Transformer modules (nn.Transformer, nn.TransformerEncoder, the encoder and decoder
layers): torch's outputs and gradients in train and eval, with and without grad, with padding and causal masks,
batch_first and norm_first both ways - and fastnn's attention kernel running in every one of those modes,
torch's inference fast path included. Also fastnn.nn.MultiheadAttention as torch's drop-in: every attribute and
method, the state_dict keys, shared Parameters."""
import copy
import inspect
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastnn

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")

E, HEADS, FF, N, S, T = 16, 4, 32, 3, 7, 5  # d_model, nhead (even: torch's fast path needs it), ff dim, batch, lengths
TORCH_ATTENTION = ("aten::_transformer_encoder_layer_fwd", "aten::_native_multi_head_attention",
                   "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                   "aten::_masked_softmax")


class OpCounter(TorchDispatchMode):
    """Counts the ops that run, by name ("fastnn::attention_fwd", "aten::_transformer_encoder_layer_fwd", ...)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def torch_attention(self) -> int:
        return sum(self.counts.get(n, 0) for n in TORCH_ATTENTION)


def _build(kind, batch_first, norm_first):
    kw = dict(dim_feedforward=FF, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    with warnings.catch_warnings():  # enable_nested_tensor without batch_first / with norm_first: torch warns
        warnings.simplefilter("ignore")
        if kind == "transformer":
            model = nn.Transformer(E, HEADS, num_encoder_layers=2, num_decoder_layers=2, **kw)
        elif kind == "encoder":
            model = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, HEADS, **kw), 2, norm=nn.LayerNorm(E))
        elif kind == "encoder_layer":
            model = nn.TransformerEncoderLayer(E, HEADS, activation="gelu", **kw)
        else:
            model = nn.TransformerDecoderLayer(E, HEADS, **kw)
    with torch.no_grad():  # non-zero biases and LayerNorm affine parameters, so a mix-up shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(kind, batch_first, masks):
    """(args, kwargs) of the model's forward and its number of attention calls. Padding pads the end of each
    sequence (left-aligned, so torch's encoder turns it into a nested tensor in inference) and keeps the first
    position, so no query row has every key masked."""
    seq = lambda L: torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)  # noqa: E731
    pad = lambda L: torch.arange(L) >= torch.tensor([L, L - 2, 2])[:, None]  # noqa: E731
    causal = lambda L: torch.ones(L, L, dtype=torch.bool).triu(1)  # noqa: E731  (bool like the padding)
    padding, is_causal = "padding" in masks, "causal" in masks
    if kind in ("encoder", "encoder_layer"):
        kw = {}
        if padding:
            kw["src_key_padding_mask"] = pad(S)
        if is_causal:
            kw.update({"mask" if kind == "encoder" else "src_mask": causal(S), "is_causal": True})
        return (seq(S),), kw, 2 if kind == "encoder" else 1
    kw = {}
    if padding:
        kw.update(tgt_key_padding_mask=pad(T), memory_key_padding_mask=pad(S))
    if is_causal:
        kw.update(tgt_mask=causal(T), tgt_is_causal=True)
    if kind == "decoder_layer":
        return (seq(T), seq(S)), kw, 2
    if padding:
        kw["src_key_padding_mask"] = pad(S)
    return (seq(S), seq(T)), kw, 2 + 2 * 2


MODES = {  # (training, grad enabled)
    "train": (True, True), "train_no_grad": (True, False), "eval": (False, True), "eval_no_grad": (False, False)}


@pytest.mark.parametrize("kind", ["transformer", "encoder", "encoder_layer", "decoder_layer"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("masks", ["none", "padding", "causal+padding"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_patched_transformer_matches_torch(kind, mode, masks, batch_first, norm_first):
    theirs = _build(kind, batch_first, norm_first)
    ours = fastnn.patch(copy.deepcopy(theirs), verbose=False)
    attentions = [m for m in ours.modules() if isinstance(m, nn.MultiheadAttention)]
    assert attentions and all(type(m) is fastnn.nn.MultiheadAttention for m in attentions)
    training, grad = MODES[mode]
    theirs.train(training)
    ours.train(training)
    args, kw, calls = _inputs(kind, batch_first, masks)
    args = [a.requires_grad_(grad) for a in args]
    with torch.set_grad_enabled(grad):
        with OpCounter() as torch_ops:
            expected = theirs(*args, **kw)
        with OpCounter() as ops:
            out = ours(*args, **kw)
    torch.testing.assert_close(out, expected)
    # fastnn's kernel ran for every attention and torch's attention never did, its fast path included
    assert ops.counts.get("fastnn::attention_fwd", 0) == calls
    assert ops.torch_attention() == 0
    if mode == "eval_no_grad" and batch_first and kind != "decoder_layer" and not norm_first:
        assert torch_ops.counts.get("aten::_transformer_encoder_layer_fwd", 0) > 0  # what the patch replaced
    if grad:
        g = torch.randn_like(out)
        ours_g = torch.autograd.grad(out, args + list(ours.parameters()), g)
        theirs_g = torch.autograd.grad(expected, args + list(theirs.parameters()), g)
        names = [n for n, _ in theirs.named_parameters()]
        assert [n for n, _ in ours.named_parameters()] == names
        for name, a, b in zip(["input"] * len(args) + names, ours_g, theirs_g):
            torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", list(MODES))
def test_fully_padded_sequences(mode):
    # A sequence that is all padding: fastnn gives zeros for its fully masked attention rows. So does torch, but
    # for its MultiheadAttention fast path (eval, no_grad: the decoder's self-attention), which gives NaN.
    theirs = _build("transformer", True, False)
    ours = fastnn.patch(copy.deepcopy(theirs), verbose=False)
    training, grad = MODES[mode]
    theirs.train(training)
    ours.train(training)
    (src, tgt), kw, _ = _inputs("transformer", True, "padding")
    for mask in ("src_key_padding_mask", "tgt_key_padding_mask", "memory_key_padding_mask"):
        kw[mask] = kw[mask].clone()
        kw[mask][1] = True
    with torch.set_grad_enabled(grad):
        out, expected = ours(src, tgt, **kw), theirs(src, tgt, **kw)
    assert out.isfinite().all()
    nan_rows = expected.isnan().any(-1)
    assert nan_rows.any(-1).tolist() == ([False, True, False] if mode == "eval_no_grad" else [False] * N)
    torch.testing.assert_close(out[~nan_rows], expected[~nan_rows])


def test_encoder_nested_tensor_padding_gives_torchs_zeros():
    # In inference torch's encoder runs a padded batch as a nested tensor: the padded positions come out zero.
    theirs = _build("encoder", True, False).eval()
    theirs.norm = None  # (a final norm would turn the zeros into its bias)
    assert theirs.use_nested_tensor
    ours = fastnn.patch(copy.deepcopy(theirs), verbose=False)
    (x,), kw, _ = _inputs("encoder", True, "padding")
    with torch.no_grad(), OpCounter() as torch_ops:
        expected = theirs(x, **kw)
    with torch.no_grad(), OpCounter() as ops:
        out = ours(x, **kw)
    assert torch_ops.counts.get("aten::_nested_tensor_from_mask", 0) == 1
    assert ops.counts.get("aten::_nested_tensor_from_mask", 0) == 1  # the same nested path, on fastnn's layers
    assert ops.counts["fastnn::attention_fwd"] == 2
    pad = kw["src_key_padding_mask"]
    assert (expected[pad] == 0).all() and (out[pad] == 0).all() and (expected[~pad] != 0).all()
    torch.testing.assert_close(out, expected)
    # a nested tensor straight into the patched layer: nested out, torch's values
    nested = torch.nested.nested_tensor([x[i, :n] for i, n in enumerate((~pad).sum(1).tolist())])
    with torch.no_grad():
        layer_out, layer_expected = (m.layers[0](nested) for m in (ours, theirs))
    assert layer_out.is_nested
    for a, b in zip(layer_out.unbind(), layer_expected.unbind()):
        torch.testing.assert_close(a, b)


def test_use_torch_fast_path_gives_torchs_forward_back(monkeypatch):
    theirs = _build("encoder", True, False).eval()
    ours = fastnn.patch(copy.deepcopy(theirs), verbose=False)
    monkeypatch.setattr(fastnn.nn.TransformerEncoderLayer, "use_torch_fast_path", True)
    (x,), kw, _ = _inputs("encoder", True, "padding")
    with torch.no_grad(), OpCounter() as ops:
        out = ours(x, **kw)
    assert ops.counts.get("aten::_transformer_encoder_layer_fwd", 0) == 2 and "fastnn::attention_fwd" not in ops.counts
    with torch.no_grad():
        torch.testing.assert_close(out, theirs(x, **kw))
    ours.train()  # no fast path in training: torch's forward calls the attention module, fastnn's
    with OpCounter() as ops:
        ours(x, **kw)
    assert ops.counts["fastnn::attention_fwd"] == 2


def test_torch_layer_with_fastnn_attention_runs_torchs_fast_path():
    # Only the attention swapped (no patch of the layer): torch's encoder layer reads merge_masks and the weights
    # for its fast path; that must work and give torch's result.
    theirs = _build("encoder_layer", True, False).eval()
    mixed = copy.deepcopy(theirs)
    mixed.self_attn = fastnn.nn.MultiheadAttention.from_torch(mixed.self_attn)
    (x,), kw, _ = _inputs("encoder_layer", True, "padding")
    with torch.no_grad():
        torch.testing.assert_close(mixed(x, **kw), theirs(x, **kw))


def test_nested_input_to_multihead_attention_takes_torchs_path():
    theirs = nn.MultiheadAttention(E, HEADS, batch_first=True).eval()
    ours = fastnn.nn.MultiheadAttention.from_torch(theirs).eval()
    x = torch.nested.nested_tensor([torch.randn(5, E), torch.randn(3, E)])
    with torch.no_grad():
        out, expected = ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0]
    for a, b in zip(out.unbind(), expected.unbind()):
        torch.testing.assert_close(a, b)


def _arguments(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("cfg", [dict(), dict(kdim=12, vdim=20, batch_first=True), dict(bias=False),
                                 dict(add_bias_kv=True, add_zero_attn=True)], ids=str)
def test_multihead_attention_has_torchs_attributes(cfg):
    theirs = nn.MultiheadAttention(E, HEADS, dropout=0.25, **cfg)
    ours = fastnn.nn.MultiheadAttention(E, HEADS, dropout=0.25, **cfg)
    assert isinstance(ours, nn.MultiheadAttention)
    for method in ("__init__", "forward"):  # torch's arguments, names and defaults
        assert _arguments(getattr(ours, method)) == _arguments(getattr(theirs, method))
    assert set(dir(theirs)) <= set(dir(ours))
    for name, value in vars(theirs).items():  # every plain attribute, with torch's value
        if not isinstance(value, (torch.Tensor, dict)):
            assert getattr(ours, name) == value, name
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert type(ours.out_proj) is type(theirs.out_proj)
    assert repr(ours) == repr(theirs)
    twin = fastnn.nn.MultiheadAttention.from_torch(theirs)
    assert all(p is q for p, q in zip(twin.parameters(), theirs.parameters()))
    assert twin.out_proj is theirs.out_proj and twin.dropout == 0.25
    kpm, mask = torch.rand(N, S) < 0.3, torch.rand(S, S) < 0.3
    for a, b in zip(twin.merge_masks(mask, kpm, torch.randn(N, S, E)),
                    theirs.merge_masks(mask, kpm, torch.randn(N, S, E))):
        assert (a == b).all() if isinstance(a, torch.Tensor) else a == b


def test_optimizer_built_before_patch_trains_the_patched_model(capsys):
    model = _build("transformer", True, False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layer = model.encoder.layers[0]
    patched = fastnn.patch(model)
    assert patched is model and type(model.encoder.layers[0]) is fastnn.nn.TransformerEncoderLayer
    assert "encoder.layers.0 (TransformerEncoderLayer)" in capsys.readouterr().out
    assert layer.norm1 is model.encoder.layers[0].norm1  # the twin holds the torch layer's own submodules
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert all(id(p) in in_opt for p in model.parameters())
    src, tgt = torch.randn(N, S, E), torch.randn(N, T, E)
    with OpCounter() as ops:
        model(src, tgt).square().mean().backward()
    assert ops.counts["fastnn::attention_bwd"] == 6
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_from_torch_leaves_the_torch_layer_unchanged():
    layer = _build("encoder_layer", True, False)
    attn, children = layer.self_attn, dict(layer.named_children())
    twin = fastnn.nn.TransformerEncoderLayer.from_torch(layer)
    assert type(layer) is nn.TransformerEncoderLayer and layer.self_attn is attn
    assert dict(layer.named_children()) == children
    assert type(twin.self_attn) is fastnn.nn.MultiheadAttention and twin.linear1 is layer.linear1
    assert twin.state_dict().keys() == layer.state_dict().keys()
    assert all(p is q for p, q in zip(twin.parameters(), layer.parameters()))
    assert twin.activation is layer.activation and twin.activation_relu_or_gelu == layer.activation_relu_or_gelu


def test_encoder_layer_constructor_is_torchs():
    kw = dict(dim_feedforward=FF, dropout=0.0, batch_first=True, activation="gelu", norm_first=True)
    torch.manual_seed(3)
    theirs = nn.TransformerEncoderLayer(E, HEADS, **kw)
    torch.manual_seed(3)
    ours = fastnn.nn.TransformerEncoderLayer(E, HEADS, **kw)
    assert type(ours.self_attn) is fastnn.nn.MultiheadAttention and ours.self_attn.batch_first
    for method in ("__init__", "forward"):
        assert _arguments(getattr(ours, method)) == _arguments(getattr(theirs, method))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    x = torch.randn(N, S, E)
    torch.testing.assert_close(ours(x), theirs(x))


def test_patch_draws_no_random_numbers():
    model = _build("transformer", True, False)
    state = torch.get_rng_state()
    fastnn.patch(model, verbose=False)
    assert torch.equal(torch.get_rng_state(), state)
