"""relaydiff.sim: Gymnasium environments of the offloading problem (numpy; policies come in as callables).

- :class:`relaydiff.sim.round_env.OffloadRoundEnv`: one round as a sequential MDP (one user per
  step, masked actions, reward = exact objective change); :class:`~relaydiff.sim.round_env.SequentialRound`
  is its engine, shared with the DRL solver.
- :class:`relaydiff.sim.scenario_env.ScenarioEnv`: rounds over time (arrivals, fading, capacity).
Running solvers against a scenario (CSV/JSON/PNG out) is :mod:`relaydiff.bench.simulate`.
"""
