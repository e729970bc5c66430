from .lstm_lm import LSTMLM, Params, State, lstm_layer_loop
