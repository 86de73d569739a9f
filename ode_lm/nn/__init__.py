"""Neural-network pieces shared by every model family."""

from ode_lm.nn.block import MLP, Attention, Block, BlockGates, DecodeBlock
from ode_lm.nn.cache import KVCache
from ode_lm.nn.dropout import Dropout, DropoutRates
from ode_lm.nn.hypernetwork import AbstractHyperNetwork, DenseHyperNetwork, RankOneHyperNetwork
from ode_lm.nn.layers import LayerNorm, Linear, add_bias, gather_rows
from ode_lm.nn.modulation import Modulation
from ode_lm.nn.saves import SAVES
from ode_lm.nn.ssm import SelectiveSSM
from ode_lm.nn.time_embedding import sinusoidal

__all__ = ["MLP", "AbstractHyperNetwork", "Attention", "Block", "BlockGates", "DecodeBlock", "DenseHyperNetwork", "Dropout",
           "DropoutRates", "KVCache", "LayerNorm", "Linear", "Modulation", "RankOneHyperNetwork", "SAVES",
           "SelectiveSSM", "add_bias", "gather_rows", "sinusoidal"]
