# The two commands of the README's quick start, plus the benchmarks and the
# upstream network e2e tests.
.PHONY: demo demo-plugin test bench conformance cleanup

## Run the demo (needs root): see README "Quick start".
demo:
	scripts/demo

## The CNI plugin alone, driven as a container runtime drives it (needs root).
demo-plugin:
	scripts/demo-plugin

## Run every test (needs root): unit, netns integration and end-to-end.
test:
	scripts/test

## Run the benchmarks (release builds); figures go to docs/performance.md.
bench:
	scripts/bench

## Kubernetes' network e2e tests against Weft on a kubeadm-like dual-stack
## cluster of kubelet nodes (needs root): the table goes to
## e2e/conformance/RESULTS.md. Options through CONFORMANCE_ARGS, e.g.
## `make conformance CONFORMANCE_ARGS='--proxy-mode iptables'`.
conformance:
	cargo run -q -p weft-e2e --bin weft-e2e -- conformance $(CONFORMANCE_ARGS)

## Remove what a crashed test or demo run left behind.
cleanup:
	cargo run -q -p weft-e2e --bin weft-e2e -- cleanup
