"""Deployment of DistServe on Triton: the deployment description (deployment.py), the models'
I/O contract (contract.py), config rendering (render.py), the server launcher (server.py) and
the helpers a model.py uses at start-up (runtime.py). `python -m deploy --help` for the CLI.

Nothing is imported here, so `from deploy.contract import ...` stays cheap for the client.
"""
