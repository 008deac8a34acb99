"""Search space: channel groups, candidates and their encoding."""

from automlprune.space.candidate import Candidate
from automlprune.space.config import SpaceConfig
from automlprune.space.graph import ChannelGroup, GroupMember, LayerInfo, build_dependency_graph
from automlprune.space.search_space import Dimension, Resolved, SearchSpace

__all__ = ["Candidate", "ChannelGroup", "Dimension", "GroupMember", "LayerInfo", "Resolved", "SearchSpace", "SpaceConfig",
           "build_dependency_graph"]
