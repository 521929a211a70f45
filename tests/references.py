"""Independent, hand-written references for the shipped cells in ``specs/``.

Nothing here imports cellspec: every step function is written directly from the equations of the
cell's paper (or of the torch.nn module it reproduces) in plain torch operations, so that the
generated code can be checked against something that was not produced by the compiler.

Conventions
-----------
* ``<module>_step(p, x, state) -> (output, new_state)``: ``p`` maps *spec parameter names* to
  tensors (matrices ``[out, in]``, vectors ``[n]``), ``x`` is ``[B, I]``, ``state`` is one tensor
  ``[B, n]`` for one-state cells and a tuple in declaration order otherwise (``(h, c)``).
* ``REFERENCES`` is keyed by the generated module name (the snake_case of the cell name), which is
  also the spec's file name: ``specs/<module>.cell`` holds ``cell <Name>``.
* ``params_from_torch(module, mod)`` / ``params_to_torch(module, params, mod)`` copy weights between
  a torch.nn cell or one-layer module (RNN/RNNCell, LSTM/LSTMCell, GRU/GRUCell, LSTM with
  proj_size) and spec names; ``grads_from_torch(module, mod)`` maps its ``.grad`` the same way.
  ``elman_params_from_torch``, ``lstm_params_from_torch``, ``torch_gru_params_from_torch`` and
  ``lstmp_params_from_torch`` are the same per cell.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _lin(W: Tensor, v: Tensor) -> Tensor:
    """W @ v for a batch of row vectors v [B, in] -> [B, out]."""
    return v @ W.T


# --------------------------------------------------------------------------- step functions


def elman_step(p, x, h):
    """Elman (1990), torch.nn.RNNCell(nonlinearity='tanh') form.  Module ``elman``."""
    h_new = torch.tanh(_lin(p["W_ih"], x) + p["b_ih"] + _lin(p["W_hh"], h) + p["b_hh"])
    return h_new, h_new


def lstm_step(p, x, state):
    """LSTM, torch.nn.LSTMCell form (gates i, f, g, o).  Module ``lstm``."""
    h, c = state
    i = torch.sigmoid(_lin(p["W_ii"], x) + p["b_ii"] + _lin(p["W_hi"], h) + p["b_hi"])
    f = torch.sigmoid(_lin(p["W_if"], x) + p["b_if"] + _lin(p["W_hf"], h) + p["b_hf"])
    g = torch.tanh(_lin(p["W_ig"], x) + p["b_ig"] + _lin(p["W_hg"], h) + p["b_hg"])
    o = torch.sigmoid(_lin(p["W_io"], x) + p["b_io"] + _lin(p["W_ho"], h) + p["b_ho"])
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    return h_new, (h_new, c_new)


def gru_step(p, x, h):
    """GRU, Cho et al. (2014) / TensorFlow GRUCell: reset before the matmul.  Module ``gru``."""
    r = torch.sigmoid(_lin(p["W_r"], x) + _lin(p["U_r"], h) + p["b_r"])
    u = torch.sigmoid(_lin(p["W_u"], x) + _lin(p["U_u"], h) + p["b_u"])
    cand = torch.tanh(_lin(p["W_c"], x) + _lin(p["U_c"], r * h) + p["b_c"])
    h_new = u * h + (1 - u) * cand
    return h_new, h_new


def torch_gru_step(p, x, h):
    """GRU, torch.nn.GRUCell form: reset after the matmul.  Module ``torch_gru`` (cell TorchGRU)."""
    r = torch.sigmoid(_lin(p["W_ir"], x) + p["b_ir"] + _lin(p["W_hr"], h) + p["b_hr"])
    z = torch.sigmoid(_lin(p["W_iz"], x) + p["b_iz"] + _lin(p["W_hz"], h) + p["b_hz"])
    n = torch.tanh(_lin(p["W_in"], x) + p["b_in"] + r * (_lin(p["W_hn"], h) + p["b_hn"]))
    h_new = (1 - z) * n + z * h
    return h_new, h_new


def peephole_lstm_step(p, x, state):
    """Gers & Schmidhuber (2000) peephole LSTM.  Module ``peephole_lstm`` (cell PeepholeLSTM)."""
    h, c = state
    i = torch.sigmoid(_lin(p["W_ii"], x) + _lin(p["W_hi"], h) + p["p_i"] * c + p["b_i"])
    f = torch.sigmoid(_lin(p["W_if"], x) + _lin(p["W_hf"], h) + p["p_f"] * c + p["b_f"])
    g = torch.tanh(_lin(p["W_ig"], x) + _lin(p["W_hg"], h) + p["b_g"])
    c_new = f * c + i * g
    o = torch.sigmoid(_lin(p["W_io"], x) + _lin(p["W_ho"], h) + p["p_o"] * c_new + p["b_o"])
    h_new = o * torch.tanh(c_new)
    return h_new, (h_new, c_new)


def cifg_lstm_step(p, x, state):
    """Greff et al. (2017) CIFG: peephole LSTM with f = 1 - i.  Module ``cifg_lstm`` (cell CifgLSTM)."""
    h, c = state
    i = torch.sigmoid(_lin(p["W_ii"], x) + _lin(p["W_hi"], h) + p["p_i"] * c + p["b_i"])
    f = 1 - i
    g = torch.tanh(_lin(p["W_ig"], x) + _lin(p["W_hg"], h) + p["b_g"])
    c_new = f * c + i * g
    o = torch.sigmoid(_lin(p["W_io"], x) + _lin(p["W_ho"], h) + p["p_o"] * c_new + p["b_o"])
    h_new = o * torch.tanh(c_new)
    return h_new, (h_new, c_new)


def lstmp_step(p, x, state):
    """Sak et al. (2014) LSTMP, torch.nn.LSTM(proj_size=P) form.  Module ``lstmp`` (cell LSTMP)."""
    h, c = state  # h: [B, P], c: [B, H]
    i = torch.sigmoid(_lin(p["W_ii"], x) + p["b_ii"] + _lin(p["W_hi"], h) + p["b_hi"])
    f = torch.sigmoid(_lin(p["W_if"], x) + p["b_if"] + _lin(p["W_hf"], h) + p["b_hf"])
    g = torch.tanh(_lin(p["W_ig"], x) + p["b_ig"] + _lin(p["W_hg"], h) + p["b_hg"])
    o = torch.sigmoid(_lin(p["W_io"], x) + p["b_io"] + _lin(p["W_ho"], h) + p["b_ho"])
    c_new = f * c + i * g
    h_new = _lin(p["W_hr"], o * torch.tanh(c_new))
    return h_new, (h_new, c_new)


def mgu_step(p, x, h):
    """Zhou et al. (2016) minimal gated unit.  Module ``mgu`` (cell MGU)."""
    f = torch.sigmoid(_lin(p["W_f"], x) + _lin(p["U_f"], h) + p["b_f"])
    h_tilde = torch.tanh(_lin(p["W_h"], x) + _lin(p["U_h"], f * h) + p["b_h"])
    h_new = (1 - f) * h + f * h_tilde
    return h_new, h_new


def ind_rnn_step(p, x, h):
    """Li et al. (2018) IndRNN: relu(W x + u * h + b).  Module ``ind_rnn`` (cell IndRNN)."""
    h_new = torch.relu(_lin(p["W"], x) + p["u"] * h + p["b"])
    return h_new, h_new


def janet_step(p, x, h):
    """van der Westhuizen & Lasenby (2018) JANET, beta = 1.  Module ``janet`` (cell JANET)."""
    s = _lin(p["U_f"], h) + _lin(p["W_f"], x) + p["b_f"]
    c_tilde = torch.tanh(_lin(p["U_c"], h) + _lin(p["W_c"], x) + p["b_c"])
    h_new = torch.sigmoid(s) * h + (1 - torch.sigmoid(s - 1.0)) * c_tilde
    return h_new, h_new


def sru_step(p, x, c):
    """Lei et al. (2018) SRU with a projected highway.  Module ``sru`` (cell SRU); output h, state c."""
    f = torch.sigmoid(_lin(p["W_f"], x) + p["v_f"] * c + p["b_f"])
    c_new = f * c + (1 - f) * _lin(p["W"], x)
    r = torch.sigmoid(_lin(p["W_r"], x) + p["v_r"] * c + p["b_r"])
    h = r * c_new + (1 - r) * _lin(p["W_s"], x)
    return h, c_new


def _ln(v: Tensor, eps: float) -> Tensor:
    """Layer norm over the last axis, biased variance, no affine (torch.nn.functional.layer_norm)."""
    return torch.nn.functional.layer_norm(v, v.shape[-1:], eps=eps)


def layer_norm_lstm_step(p, x, state):
    """TensorFlow's LayerNormBasicLSTMCell (Ba et al. 2016): gates i, j, f, o each normalised
    (eps 1e-12), forget bias 1, the new cell state normalised.  Module ``layer_norm_lstm``."""
    h, c = state
    gate = {}
    for g in "ijfo":
        gate[g] = p[f"g_{g}"] * _ln(_lin(p[f"W_{g}"], x) + _lin(p[f"U_{g}"], h), 1e-12) + p[f"b_{g}"]
    i, j, f, o = torch.sigmoid(gate["i"]), torch.tanh(gate["j"]), torch.sigmoid(gate["f"] + 1.0), torch.sigmoid(gate["o"])
    c_new = p["g_c"] * _ln(c * f + i * j, 1e-12) + p["b_c"]
    h_new = torch.tanh(c_new) * o
    return h_new, (h_new, c_new)


def haste_layer_norm_lstm_step(p, x, state):
    """Haste's LayerNormLSTM (Ba et al. 2016): LN(Wx) and LN(Rh) each over all four gates
    (concatenated, gain only), plus bias; LN of c' (gain, shift) before tanh; gates i, g, f, o.
    Module ``haste_layer_norm_lstm``."""
    h, c = state
    gs = "igfo"
    wx = torch.cat([_lin(p[f"W_{g}"], x) for g in gs], -1)
    rh = torch.cat([_lin(p[f"R_{g}"], h) for g in gs], -1)
    gx = torch.cat([p[f"gx_{g}"] for g in gs])
    gh = torch.cat([p[f"gh_{g}"] for g in gs])
    b = torch.cat([p[f"b_{g}"] for g in gs])
    z = gx * _ln(wx, 1e-5) + gh * _ln(rh, 1e-5) + b
    zi, zg, zf, zo = z.chunk(4, -1)
    c_new = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
    h_new = torch.sigmoid(zo) * torch.tanh(p["gamma_h"] * _ln(c_new, 1e-5) + p["beta_h"])
    return h_new, (h_new, c_new)


def layer_norm_gru_step(p, x, h):
    """GRU (Cho et al. 2014) with layer-normalised input and recurrent projections per gate, the
    reset gate scaling the normalised recurrent candidate term.  Module ``layer_norm_gru``."""

    def ln(v, g, b):
        return p[g] * _ln(v, 1e-5) + p[b]

    r = torch.sigmoid(ln(_lin(p["W_r"], x), "gx_r", "bx_r") + ln(_lin(p["U_r"], h), "gh_r", "bh_r"))
    u = torch.sigmoid(ln(_lin(p["W_u"], x), "gx_u", "bx_u") + ln(_lin(p["U_u"], h), "gh_u", "bh_u"))
    cand = torch.tanh(ln(_lin(p["W_c"], x), "gx_c", "bx_c") + r * ln(_lin(p["U_c"], h), "gh_c", "bh_c"))
    h_new = u * h + (1 - u) * cand
    return h_new, h_new


def slstm_step(p, x, state):
    """sLSTM of xLSTM (Beck et al. 2024, eqs. 8-17), one head, exponential input and forget
    gates with the stabiliser state m.  Module ``slstm``; states (h, c, n, m)."""
    h, c, n, m = state

    def pre(g):
        return _lin(p[f"W_{g}"], x) + _lin(p[f"R_{g}"], h) + p[f"b_{g}"]

    z = torch.tanh(pre("z"))
    i_log, f_log = pre("i"), pre("f")
    o = torch.sigmoid(pre("o"))
    m_new = torch.maximum(f_log + m, i_log)
    i = torch.exp(i_log - m_new)
    f = torch.exp(f_log + m - m_new)
    c_new = f * c + i * z
    n_new = f * n + i
    h_new = o * (c_new / n_new)
    return h_new, (h_new, c_new, n_new, m_new)


def co_rnn_step(p, x, state, dt=0.042, gamma=2.7, eps=4.7):
    """coRNN (Rusch & Mishra 2021), the authors' update order: z first, y reads the new z.
    Module ``co_rnn``; states (y, z), output y."""
    y, z = state
    z_new = z + dt * (torch.tanh(_lin(p["W"], y) + _lin(p["W_z"], z) + _lin(p["V"], x) + p["b"]) - gamma * y - eps * z)
    y_new = y + dt * z_new
    return y_new, (y_new, z_new)


def antisymmetric_rnn_step(p, x, h, eps=0.01, gamma=0.01):
    """AntisymmetricRNN (Chang et al. 2019, eq. 12).  Module ``antisymmetric_rnn``."""
    W = p["W"]
    A = W - W.T - gamma * torch.eye(W.shape[0], dtype=W.dtype)
    h_new = h + eps * torch.tanh(_lin(A, h) + _lin(p["V"], x) + p["b"])
    return h_new, h_new


def def_lstm_step(p, x, state):
    """LSTM with one bias per gate and a trained scalar beta inside the output tanh.  Module
    ``def_lstm``."""
    h, c = state

    def pre(g):
        return _lin(p[f"W_{g}"], x) + _lin(p[f"U_{g}"], h) + p[f"b_{g}"]

    i, f, g, o = torch.sigmoid(pre("i")), torch.sigmoid(pre("f")), torch.tanh(pre("g")), torch.sigmoid(pre("o"))
    c_new = f * c + i * g
    h_new = o * torch.tanh(p["beta"] * c_new)
    return h_new, (h_new, c_new)


# ---- cells with random ops. ``masks`` (name -> [B, size] tensor of this step) gives the
# training-mode masks as the spec names them; None is evaluation mode (each mask's expectation).
def _lstm_gates(p, x, h):
    i = torch.sigmoid(_lin(p["W_ii"], x) + p["b_ii"] + _lin(p["W_hi"], h) + p["b_hi"])
    f = torch.sigmoid(_lin(p["W_if"], x) + p["b_if"] + _lin(p["W_hf"], h) + p["b_hf"])
    g = torch.tanh(_lin(p["W_ig"], x) + p["b_ig"] + _lin(p["W_hg"], h) + p["b_hg"])
    o = torch.sigmoid(_lin(p["W_io"], x) + p["b_io"] + _lin(p["W_ho"], h) + p["b_ho"])
    return i, f, g, o


def zoneout_lstm_step(p, x, state, masks=None, zoneout_h=0.05, zoneout_c=0.5):
    """Zoneout LSTM (Krueger et al. 2017): each state keeps its old value where its Bernoulli
    mask is 1; evaluation: p * old + (1 - p) * new; h from the un-zoned c.  Module ``zoneout_lstm``."""
    h, c = state
    i, f, g, o = _lstm_gates(p, x, h)
    c_upd = f * c + i * g
    h_upd = o * torch.tanh(c_upd)
    keep_c = zoneout_c if masks is None else masks["keep_c"]
    keep_h = zoneout_h if masks is None else masks["keep_h"]
    c_new = keep_c * c + (1 - keep_c) * c_upd
    h_new = keep_h * h + (1 - keep_h) * h_upd
    return h_new, (h_new, c_new)


def variational_lstm_step(p, x, state, masks=None, dropout_x=0.25, dropout_h=0.25):
    """Variational LSTM (Gal & Ghahramani 2016): x and h dropped by masks (scaled by 1/(1-p),
    the same at every step of a sequence); evaluation: nothing dropped.  Module ``variational_lstm``."""
    h, c = state
    if masks is not None:
        x, h_in = x * masks["mask_x"], h * masks["mask_h"]
    else:
        h_in = h
    i, f, g, o = _lstm_gates(p, x, h_in)
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    return h_new, (h_new, c_new)


def layer_norm_basic_lstm_step(p, x, state, masks=None, recurrent_dropout=0.1):
    """TensorFlow's LayerNormBasicLSTMCell with recurrent dropout on the candidate j (Semeniuta
    et al. 2016); evaluation: none.  Module ``layer_norm_basic_lstm``."""
    h, c = state
    gate = {}
    for g in "ijfo":
        gate[g] = p[f"g_{g}"] * _ln(_lin(p[f"W_{g}"], x) + _lin(p[f"U_{g}"], h), 1e-12) + p[f"b_{g}"]
    i, j, f, o = torch.sigmoid(gate["i"]), torch.tanh(gate["j"]), torch.sigmoid(gate["f"] + 1.0), torch.sigmoid(gate["o"])
    if masks is not None:
        j = j * masks["mask_j"]
    c_new = p["g_c"] * _ln(c * f + i * j, 1e-12) + p["b_c"]
    h_new = torch.tanh(c_new) * o
    return h_new, (h_new, c_new)


# module name -> step function.  Cell names: elman=Elman, lstm=LSTM, gru=GRU, torch_gru=TorchGRU,
# peephole_lstm=PeepholeLSTM, cifg_lstm=CifgLSTM, lstmp=LSTMP, mgu=MGU, ind_rnn=IndRNN,
# janet=JANET, sru=SRU.
REFERENCES = {
    "elman": elman_step,
    "lstm": lstm_step,
    "gru": gru_step,
    "torch_gru": torch_gru_step,
    "peephole_lstm": peephole_lstm_step,
    "cifg_lstm": cifg_lstm_step,
    "lstmp": lstmp_step,
    "mgu": mgu_step,
    "ind_rnn": ind_rnn_step,
    "janet": janet_step,
    "sru": sru_step,
    "layer_norm_lstm": layer_norm_lstm_step,
    "haste_layer_norm_lstm": haste_layer_norm_lstm_step,
    "layer_norm_gru": layer_norm_gru_step,
    "slstm": slstm_step,
    "co_rnn": co_rnn_step,
    "antisymmetric_rnn": antisymmetric_rnn_step,
    "def_lstm": def_lstm_step,
    "zoneout_lstm": zoneout_lstm_step,
    "variational_lstm": variational_lstm_step,
    "layer_norm_basic_lstm": layer_norm_basic_lstm_step,
}

# module name -> cell name (generated classes are <Name>Cell and <Name>).
CELLS = {
    "elman": "Elman",
    "lstm": "LSTM",
    "gru": "GRU",
    "torch_gru": "TorchGRU",
    "peephole_lstm": "PeepholeLSTM",
    "cifg_lstm": "CifgLSTM",
    "lstmp": "LSTMP",
    "mgu": "MGU",
    "ind_rnn": "IndRNN",
    "janet": "JANET",
    "sru": "SRU",
    "layer_norm_lstm": "LayerNormLSTM",
    "haste_layer_norm_lstm": "HasteLayerNormLSTM",
    "layer_norm_gru": "LayerNormGRU",
    "slstm": "SLSTM",
    "co_rnn": "CoRNN",
    "antisymmetric_rnn": "AntisymmetricRNN",
    "def_lstm": "DefLSTM",
    "zoneout_lstm": "ZoneoutLSTM",
    "variational_lstm": "VariationalLSTM",
    "layer_norm_basic_lstm": "LayerNormBasicLSTM",
}


def state_sizes(name: str, I: int, H: int, P: int | None = None) -> list[int]:
    """Sizes of the state vectors, in declaration order."""
    if name in ("lstm", "peephole_lstm", "cifg_lstm", "layer_norm_lstm", "haste_layer_norm_lstm", "co_rnn",
                "def_lstm", "zoneout_lstm", "variational_lstm", "layer_norm_basic_lstm"):
        return [H, H]
    if name == "slstm":
        return [H, H, H, H]
    if name == "lstmp":
        return [P, H]
    return [H]


def param_shapes(name: str, I: int, H: int, P: int | None = None) -> dict[str, tuple]:
    """Spec parameter name -> shape, written out by hand from the specs."""

    def gates(gs, rec=H, biases=("b_i{}", "b_h{}")):
        d = {}
        for g in gs:
            d[f"W_i{g}"] = (H, I)
            d[f"W_h{g}"] = (H, rec)
            for b in biases:
                d[b.format(g)] = (H,)
        return d

    if name == "elman":
        return {"W_ih": (H, I), "W_hh": (H, H), "b_ih": (H,), "b_hh": (H,)}
    if name in ("lstm", "zoneout_lstm", "variational_lstm"):
        return gates("ifgo")
    if name == "lstmp":
        d = gates("ifgo", rec=P)
        d["W_hr"] = (P, H)
        return d
    if name == "torch_gru":
        return gates("rzn")
    if name == "gru":
        return {
            f"{m}_{g}": ((H, I) if m == "W" else (H, H) if m == "U" else (H,))
            for g in "ruc"
            for m in ("W", "U", "b")
        }
    if name in ("peephole_lstm", "cifg_lstm"):
        gs = "ifgo" if name == "peephole_lstm" else "igo"
        d = gates(gs, biases=("b_{}",))
        for g in gs:
            if g != "g":
                d[f"p_{g}"] = (H,)
        return d
    if name == "mgu":
        return {
            "W_f": (H, I),
            "U_f": (H, H),
            "b_f": (H,),
            "W_h": (H, I),
            "U_h": (H, H),
            "b_h": (H,),
        }
    if name == "ind_rnn":
        return {"W": (H, I), "u": (H,), "b": (H,)}
    if name == "janet":
        return {
            "W_f": (H, I),
            "U_f": (H, H),
            "b_f": (H,),
            "W_c": (H, I),
            "U_c": (H, H),
            "b_c": (H,),
        }
    if name == "sru":
        return {
            "W": (H, I),
            "W_f": (H, I),
            "v_f": (H,),
            "b_f": (H,),
            "W_r": (H, I),
            "v_r": (H,),
            "b_r": (H,),
            "W_s": (H, I),
        }
    if name in ("layer_norm_lstm", "layer_norm_basic_lstm"):
        d = {}
        for g in "ijfo":
            d.update({f"W_{g}": (H, I), f"U_{g}": (H, H), f"g_{g}": (H,), f"b_{g}": (H,)})
        return {**d, "g_c": (H,), "b_c": (H,)}
    if name == "haste_layer_norm_lstm":
        d = {f"W_{g}": (H, I) for g in "igfo"}
        d.update({f"R_{g}": (H, H) for g in "igfo"})
        for pre in ("b", "gx", "gh"):
            d.update({f"{pre}_{g}": (H,) for g in "igfo"})
        return {**d, "gamma_h": (H,), "beta_h": (H,)}
    if name == "layer_norm_gru":
        d = {}
        for g in "ruc":
            d.update({f"W_{g}": (H, I), f"U_{g}": (H, H)})
        for g in "ruc":
            d.update({f"gx_{g}": (H,), f"bx_{g}": (H,), f"gh_{g}": (H,), f"bh_{g}": (H,)})
        return d
    if name == "slstm":
        d = {}
        for g in "zifo":
            d.update({f"W_{g}": (H, I), f"R_{g}": (H, H), f"b_{g}": (H,)})
        return d
    if name == "co_rnn":
        return {"V": (H, I), "W": (H, H), "W_z": (H, H), "b": (H,)}
    if name == "antisymmetric_rnn":
        return {"W": (H, H), "V": (H, I), "b": (H,)}
    if name == "def_lstm":
        d = {}
        for g in "ifgo":
            d.update({f"W_{g}": (H, I), f"U_{g}": (H, H), f"b_{g}": (H,)})
        return {**d, "beta": ()}
    raise KeyError(name)


def run_sequence(step, p, xs: Tensor, state):
    """Apply ``step`` over xs [T, B, I]; returns (outputs [T, B, *], final_state)."""
    outs = []
    for t in range(xs.shape[0]):
        out, state = step(p, xs[t], state)
        outs.append(out)
    return torch.stack(outs), state


# --------------------------------------------------------------------------- torch.nn weight maps
#
# torch stacks the gates of one layer along dim 0 of weight_ih / weight_hh / bias_ih / bias_hh.
# Cells (nn.RNNCell, nn.LSTMCell, nn.GRUCell) name them weight_ih, ...; layers (nn.RNN, nn.LSTM,
# nn.GRU) name them weight_ih_l0, ...; nn.LSTM(proj_size=P) adds weight_hr_l0 [P, H].

_GATES = {"elman": None, "lstm": "ifgo", "lstmp": "ifgo", "torch_gru": "rzn"}
TORCH_NATIVE = tuple(_GATES)


def _suffix(mod: nn.Module) -> str:
    return "_l0" if isinstance(mod, nn.RNNBase) else ""


def _torch_tensors(mod: nn.Module, grads: bool = False) -> dict[str, Tensor]:
    out = {}
    for k, v in mod.named_parameters():
        t = v.grad if grads else v
        out[k] = None if t is None else t.detach().clone()
    return out


def _from_torch(name: str, tensors: dict[str, Tensor], sfx: str) -> dict[str, Tensor]:
    wi, wh = tensors["weight_ih" + sfx], tensors["weight_hh" + sfx]
    bi, bh = tensors["bias_ih" + sfx], tensors["bias_hh" + sfx]
    gates = _GATES[name]
    if gates is None:  # Elman
        return {"W_ih": wi, "W_hh": wh, "b_ih": bi, "b_hh": bh}
    n = len(gates)
    p = {}
    for g, a, b, c, d in zip(gates, wi.chunk(n, 0), wh.chunk(n, 0), bi.chunk(n, 0), bh.chunk(n, 0)):
        p[f"W_i{g}"], p[f"W_h{g}"], p[f"b_i{g}"], p[f"b_h{g}"] = a, b, c, d
    if name == "lstmp":
        p["W_hr"] = tensors["weight_hr" + sfx]
    return {k: v.contiguous() for k, v in p.items()}


def _to_torch(name: str, p: dict[str, Tensor], sfx: str) -> dict[str, Tensor]:
    gates = _GATES[name]
    if gates is None:
        return {
            "weight_ih" + sfx: p["W_ih"],
            "weight_hh" + sfx: p["W_hh"],
            "bias_ih" + sfx: p["b_ih"],
            "bias_hh" + sfx: p["b_hh"],
        }
    sd = {
        "weight_ih" + sfx: torch.cat([p[f"W_i{g}"] for g in gates]),
        "weight_hh" + sfx: torch.cat([p[f"W_h{g}"] for g in gates]),
        "bias_ih" + sfx: torch.cat([p[f"b_i{g}"] for g in gates]),
        "bias_hh" + sfx: torch.cat([p[f"b_h{g}"] for g in gates]),
    }
    if name == "lstmp":
        sd["weight_hr" + sfx] = p["W_hr"]
    return sd


def params_from_torch(name: str, mod: nn.Module) -> dict[str, Tensor]:
    """Spec-named parameters (detached copies) of a torch.nn cell/layer, for module ``name``."""
    return _from_torch(name, _torch_tensors(mod), _suffix(mod))


def grads_from_torch(name: str, mod: nn.Module) -> dict[str, Tensor]:
    """The torch module's parameter gradients, mapped to spec names."""
    return _from_torch(name, _torch_tensors(mod, grads=True), _suffix(mod))


@torch.no_grad()
def params_to_torch(name: str, p: dict[str, Tensor], mod: nn.Module) -> nn.Module:
    """Copy spec-named parameters into a torch.nn cell/layer (in place); returns ``mod``."""
    sd = _to_torch(name, {k: v.detach() for k, v in p.items()}, _suffix(mod))
    mod.load_state_dict(sd, strict=True)
    return mod


def elman_params_from_torch(mod: nn.RNN | nn.RNNCell) -> dict[str, Tensor]:
    """nn.RNN / nn.RNNCell (tanh) -> spec ``elman`` names (W_ih, W_hh, b_ih, b_hh)."""
    return params_from_torch("elman", mod)


def lstm_params_from_torch(mod: nn.LSTM | nn.LSTMCell) -> dict[str, Tensor]:
    """nn.LSTM / nn.LSTMCell -> spec ``lstm`` names; rows of weight_ih are [i; f; g; o]."""
    return params_from_torch("lstm", mod)


def torch_gru_params_from_torch(mod: nn.GRU | nn.GRUCell) -> dict[str, Tensor]:
    """nn.GRU / nn.GRUCell -> spec ``torch_gru`` names; rows of weight_ih are [r; z; n]."""
    return params_from_torch("torch_gru", mod)


def lstmp_params_from_torch(mod: nn.LSTM) -> dict[str, Tensor]:
    """nn.LSTM(proj_size=P) -> spec ``lstmp`` names, plus weight_hr_l0 -> W_hr."""
    return params_from_torch("lstmp", mod)


def make_torch_module(
    name: str,
    I: int,
    H: int,
    P: int | None = None,
    *,
    layer: bool,
    batch_first: bool = False,
    dtype=torch.float64,
) -> nn.Module:
    """The torch.nn module that spec ``name`` reproduces (a cell, or a one-layer sequence layer)."""
    if name == "elman":
        m = nn.RNN(I, H, batch_first=batch_first) if layer else nn.RNNCell(I, H)
    elif name == "lstm":
        m = nn.LSTM(I, H, batch_first=batch_first) if layer else nn.LSTMCell(I, H)
    elif name == "torch_gru":
        m = nn.GRU(I, H, batch_first=batch_first) if layer else nn.GRUCell(I, H)
    elif name == "lstmp":
        if not layer:
            raise ValueError("torch has no LSTMCell with proj_size; use nn.LSTM")
        m = nn.LSTM(I, H, proj_size=P, batch_first=batch_first)
    else:
        raise KeyError(name)
    return m.to(dtype)
