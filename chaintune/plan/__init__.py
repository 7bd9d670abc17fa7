"""Planning a run before it starts: :mod:`~chaintune.plan.memory` measures what one chain step holds and applies
the paper's h* rule; :mod:`~chaintune.plan.recommend` picks the estimator the measured rankings recommend for a
reward within a memory budget (``chaintune plan``)."""
