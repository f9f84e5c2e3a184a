"""The pieces of bench/run: setup, configs, servers, load generators, scenarios, report."""
