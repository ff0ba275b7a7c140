from .methods import IA3, METHOD_KINDS, Adapter, BitFit, DoRA, Freeze, Full, LlamaAdapter, LoRA, Method, PrefixTuning, PromptTuning, QLoRA, Shira
from .model import ModelArch, MoE
from .scenario import Scenario
from .training import Checkpointing, GaLore, InferenceQuant, InferWorkload, Optimizer, TrainWorkload

__all__ = [
    "IA3", "METHOD_KINDS", "Adapter", "BitFit", "DoRA", "Freeze", "Full", "LlamaAdapter", "LoRA", "Shira", "Method", "PrefixTuning",
    "PromptTuning", "QLoRA", "ModelArch", "MoE", "Scenario", "Checkpointing", "InferenceQuant", "InferWorkload",
    "GaLore", "Optimizer", "TrainWorkload",
]
