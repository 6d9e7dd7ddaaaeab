"""Prefect flows for geowm: ingest, train, forecast and the scheduled ingest -> forecast -> alerts pipeline.

Modules: :mod:`flows.tasks` (tasks wrapping geowm's public functions), :mod:`flows.pipeline` (the
flows), :mod:`flows.ledger` (which scenes a pipeline has processed), :mod:`flows.simulator` (new
scenes arriving day by day), :mod:`flows.serve` (deployments with schedules, ``geowm serve``),
:mod:`flows.settings` (names, ports, environment variables). Data flows one way: geowm never
imports this package.
"""
