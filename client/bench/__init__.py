"""Goodput benchmark (issue #4): real workloads, a streaming replay client, SLO attainment.

    workloads.py  WorkloadSpec / LengthCaps -> load_workload() -> Workload (requests, arrivals)
    datasets.py   the raw ShareGPT / HumanEval files under data/ (./build.sh setup fetches them)
    endpoints.py  triton-http | triton-grpc | openai: one streaming request -> StreamEvents
    runner.py     replay(endpoint, url, model, requests, arrivals) -> list[RequestResult]
    metrics.py    RequestResult, Timeline, SLO, attainment, summarize
    goodput.py    search_goodput(measure, slo), sweep, measure_baseline (relative SLOs)
    plots.py      attainment vs rate / vs SLO scale, TTFT/TPOT CDFs (PNG)
    cli.py        python -m client.bench run | goodput | plot | baseline | describe
"""
