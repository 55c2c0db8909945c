"""relaydiff.system: the system model (edge, devices, wireless, quality) and the one-round problem.

Entry points: :func:`relaydiff.system.problem.sample_instance`, :func:`relaydiff.system.problem.evaluate`,
:func:`relaydiff.system.scenario.load_scenario`, :func:`relaydiff.system.profiles.load_profile`.
"""
