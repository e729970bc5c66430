"""The nn.LSTM reference model: static training with cuDNN / MKL kernels, what `dynlm bench` measures
the per-stream code paths against (tests use it too)."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import LSTMLM, Params, State
from ..model.regularizers import embedding_dropout, locked_dropout

# ---- the nn.LSTM reference model ------------------------------------------------------------------
class TorchLSTMLM(nn.Module):
    """The functional LSTMLM built from stock modules: nn.Embedding, one nn.LSTM per layer (with its
    two biases; bias_hh starts at 0), the same regularisers and the same softmax code (LSTMLM.nll on
    this module's tensors). The reference for `functional_vs_nn_lstm_train`. model.weight_drop is
    not applied (nn.LSTM has no DropConnect)."""

    def __init__(self, lm: LSTMLM, params: Params):
        super().__init__()
        self.lm = lm
        ref = params["embed"]
        self.embed = nn.Embedding(*ref.shape, device=ref.device, dtype=ref.dtype)
        self.layers = nn.ModuleList(nn.LSTM(n_in, n_h, batch_first=True, device=ref.device, dtype=ref.dtype)
                                    for n_in, n_h in zip(lm.inputs, lm.sizes))
        self._softmax_names = [k for k in params if k != "embed" and not k.startswith("lstm.")]
        self.softmax = nn.ParameterList(nn.Parameter(params[k].detach().clone()) for k in self._softmax_names)
        with torch.no_grad():
            self.embed.weight.copy_(ref)
            for l, layer in enumerate(self.layers):
                layer.weight_ih_l0.copy_(params[f"lstm.{l}.w_ih"])
                layer.weight_hh_l0.copy_(params[f"lstm.{l}.w_hh"])
                layer.bias_ih_l0.copy_(params[f"lstm.{l}.b"])
                layer.bias_hh_l0.zero_()

    def softmax_params(self) -> Params:
        return {"embed": self.embed.weight, **dict(zip(self._softmax_names, self.softmax))}

    def hidden(self, tokens: Tensor, state: State, train: bool = False) -> tuple[Tensor, State]:
        c = self.lm.cfg
        if train and c.dropout_emb > 0:
            x = F.embedding(tokens, embedding_dropout(self.embed.weight, c.dropout_emb))
        else:
            x = self.embed(tokens)
        x = locked_dropout(x, c.dropout_input, train)
        new_state = []
        for l, layer in enumerate(self.layers):
            h0, c0 = state[l]
            x, (h, cell) = layer(x, (h0.unsqueeze(0), c0.unsqueeze(0)))
            new_state.append((h.squeeze(0), cell.squeeze(0)))
            x = locked_dropout(x, c.dropout_output if l == c.n_layers - 1 else c.dropout_hidden, train)
        return x, new_state

    def nll(self, out: Tensor, targets: Tensor) -> Tensor:
        return self.lm.nll(self.softmax_params(), out, targets)
