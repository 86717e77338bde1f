"""LightningModules: the episodic base and the learners built on it."""

from .base import EpisodicLearner
from .maml import MAMLLearner
from .protonet import OnlineProtoNetLearner, ProtoNetLearner
from .readout import TTTReadoutLearner
from .sequence import SequenceMetaLearner

__all__ = ["EpisodicLearner", "MAMLLearner", "OnlineProtoNetLearner", "ProtoNetLearner", "SequenceMetaLearner", "TTTReadoutLearner"]
