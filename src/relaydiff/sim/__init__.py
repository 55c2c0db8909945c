"""relaydiff.sim: Gymnasium environments of the offloading problem and the scenario simulator.

- :class:`relaydiff.sim.round_env.OffloadRoundEnv`: one round as a sequential MDP (one user per
  step, masked actions, reward = exact objective change); :class:`~relaydiff.sim.round_env.SequentialRound`
  is its engine, shared with the DRL solver.
- :class:`relaydiff.sim.scenario_env.ScenarioEnv`: rounds over time (arrivals, fading, capacity).
- :func:`relaydiff.sim.simulate.simulate`: solvers by name against a scenario, CSV/JSON/PNG out.
"""
