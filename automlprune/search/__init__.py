"""Search strategies (registered by name), budgets, the run store and the search loop."""

from automlprune.registry import Registry

STRATEGIES: Registry = Registry("strategy")

for _name, _entry, _desc in [
    ("uniform", "automlprune.search.baselines:UniformStrategy", "one keep ratio for every group, by bisection to the budget"),
    ("random", "automlprune.search.baselines:RandomStrategy", "random feasible candidates from the grid"),
    ("greedy", "automlprune.search.baselines:GreedyStrategy", "per-group sensitivity, then greedy allocation to the budget (AIMET/NetAdapt style)"),
    ("global-magnitude", "automlprune.search.baselines:GlobalMagnitudeStrategy", "one |w| threshold across layers sets every layer's weight density (global magnitude pruning)"),
    ("global", "automlprune.search.baselines:GlobalStrategy", "one importance ranking of channels across groups, cut to the budget"),
    ("optuna-tpe", "automlprune.search.optuna_strategies:TPEStrategy", "Optuna multivariate TPE, accuracy vs cost with the budget as constraint"),
    ("optuna-nsga2", "automlprune.search.optuna_strategies:NSGA2Strategy", "Optuna NSGA-II, accuracy vs cost with the budget as constraint"),
    ("optuna-nsga3", "automlprune.search.optuna_strategies:NSGA3Strategy", "Optuna NSGA-III, accuracy vs cost with the budget as constraint"),
    ("optuna-random", "automlprune.search.optuna_strategies:RandomSamplerStrategy", "Optuna's random sampler (proposals repaired to the budget)"),
    ("optuna-qmc", "automlprune.search.optuna_strategies:QMCStrategy", "Optuna's quasi-Monte-Carlo sampler"),
    ("optuna-gp", "automlprune.search.optuna_strategies:GPStrategy", "Optuna's Gaussian-process sampler with the budget as constraint"),
    ("prunenet", "automlprune.search.prunenet:PruneNetStrategy", "global reconstruction-loss importance, cost-aware allocation exact for the budget (PruneNet)"),
    ("dmcp", "automlprune.search.dmcp:DMCPStrategy", "DMCP: differentiable Markov channel gates trained against a budget loss (Guo et al., 2020)"),
    ("ddpg", "automlprune.rl.agents:DDPGStrategy", "AMC: DDPG (stable-baselines3) in the layer-width environment"),
    ("td3", "automlprune.rl.agents:TD3Strategy", "TD3 (stable-baselines3) in the layer-width environment"),
    ("sac", "automlprune.rl.agents:SACStrategy", "SAC (stable-baselines3) in the layer-width environment"),
    ("ppo", "automlprune.rl.agents:PPOStrategy", "PPO (stable-baselines3) over the ratio grid in the layer-width environment"),
    ("tp-local", "automlprune.search.torch_pruning_anchor:TorchPruningStrategy", "anchor: Torch-Pruning's BasePruner, group magnitude importance, per-layer ratio, iterative"),
    ("tp-global", "automlprune.search.torch_pruning_anchor:TorchPruningGlobalStrategy", "anchor: Torch-Pruning's BasePruner, group magnitude importance, global ranking, iterative"),
    ("haq", "automlprune.rl.agents:HAQStrategy", "HAQ: DDPG choosing per-layer weight bits, lowered from the last layer to the budget"),
    ("resrep", "automlprune.search.resrep:ResRepStrategy", "ResRep: compactors with gradient resetting and group lasso, masks under the budget, folded (Ding et al., 2021)"),
    ("gate-decorator", "automlprune.search.gate_decorator:GateDecoratorStrategy", "Gate Decorator: BN gates, Taylor scores in Ticks, L1 in Tocks, global group pruning to the budget (You et al., 2019)"),
    ("greg1", "automlprune.search.greg:GRegStrategy", "GReg-1: growing L2 penalty on filters picked once by L1, trained weights (Wang et al., 2021)"),
    ("movement", "automlprune.search.movement:MovementStrategy", "movement pruning: learned scores, top-k masks on a cubic schedule while training (Sanh et al., 2020)"),
    ("greg2", "automlprune.search.greg:GReg2Strategy", "GReg-2: uniform growing penalty reveals the filters to go, then GReg-1 (Wang et al., 2021)"),
    ("l0-anneal", "automlprune.search.l0_anneal:L0AnnealStrategy", "annealing with L0 control: channel counts annealed to the budget on FSA's schedule while training, the rest held at zero (Guo et al., 2021)"),
    ("prune-while-training", "automlprune.search.prune_while_training:PruneWhileTrainingStrategy", "filters pruned at intervals while training by L1, mean activation or at random (Roy et al., 2020)"),
    ("gradual-frs", "automlprune.search.gradual_frs:GradualFRSStrategy", "gradual channel pruning while training by feature relevance scores (LRP), globally to the budget (Aketi et al., 2020)"),
    ("play-and-prune", "automlprune.search.play_and_prune:PlayAndPruneStrategy", "Play and Prune: an L1 pull on the weakest channels, removed below a threshold while training, at a rate an accuracy controller sets; takes accuracy_drop budgets (Singh et al., 2019)"),
    ("bwcp", "automlprune.search.bwcp:BWCPStrategy", "BWCP: batch whitening with Gumbel channel masks from sharpened activation probabilities, a budget term, a hard last quarter, folded (Shao et al., 2021)"),
    ("pconv-admm", "automlprune.search.pconv_admm:PConvADMMStrategy", "PCONV kernel patterns and connectivity pruning by ADMM, then masked retraining (Ma et al., 2020)"),
    ("information-dropout", "automlprune.search.information_dropout:InformationDropoutStrategy",
     "kernels pruned by learned information-dropout noise (log-uniform KL), saturated first, to the budget (Zhan et al., 2019)"),
]:
    STRATEGIES.register(_name, _entry, description=_desc)

__all__ = ["STRATEGIES"]
