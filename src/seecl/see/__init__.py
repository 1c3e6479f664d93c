"""SEE itself: task reconstruction, the ensemble directory and `SeeEnsemble` (learn / ask)."""
