// Command coredns is CoreDNS for Weft's e2e harness: the cluster DNS of
// clusters with kubelet nodes, as kubeadm deploys it. It is CoreDNS's own
// server (coremain) with only the plugins the harness's Corefile uses
// compiled in, plus `hosts`, which the upstream DNS test "should support
// configurable pod resolv.conf" puts in a Corefile of its own (the binary
// is also /coredns in the conformance test images). That keeps the cloud providers' SDKs (route53, azure,
// clouddns) and their dependencies out of the build. There is no `forward`
// (the test machine has no upstream resolver), and so no `loop`, which only
// detects forwarding loops. Driven by ../build.sh.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// directives are the plugins compiled in, in the order of CoreDNS's
// plugin.cfg: a request passes through them in this order, whatever order
// the Corefile names them in. A directive missing here is a Corefile error.
var directives = []string{
	"reload",
	"ready",
	"health",
	"prometheus",
	"errors",
	"log",
	"loadbalance",
	"cache",
	"hosts",
	"kubernetes",
}

func main() {
	// The server type reads this list when it parses the Corefile, after
	// every plugin package has registered itself in its init.
	dnsserver.Directives = directives
	coremain.Run()
}
