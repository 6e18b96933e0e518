"""`mcpfleet`: the fleet's command line, one module per noun, thin over the parts below.

Each noun module has `add_commands(sub)`; its commands are functions of the parsed arguments and
a database connection (`run.on_database`) or the gateway's API (`run.on_api`). Refusals are
`core.errors.FleetError`s, which `cli.main` prints.
"""
