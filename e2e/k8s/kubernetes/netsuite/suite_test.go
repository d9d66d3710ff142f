// Package netsuite is a trimmed build of the upstream Kubernetes e2e suite for
// Weft's conformance run: it links the framework and the network test packages
// only, so `go test -c` builds in a fraction of the full e2e.test's time and
// size. The flags and the run are those of the upstream binary, so the usual
// --kubeconfig, --provider, --ginkgo.focus/skip and --report-dir apply.
package netsuite

import (
	"flag"
	"fmt"
	"os"
	"testing"

	"k8s.io/component-base/version"
	"k8s.io/kubernetes/test/e2e"
	"k8s.io/kubernetes/test/e2e/framework"
	"k8s.io/kubernetes/test/e2e/framework/config"
	"k8s.io/kubernetes/test/e2e/framework/testfiles"
	e2etestingmanifests "k8s.io/kubernetes/test/e2e/testing-manifests"
	testfixtures "k8s.io/kubernetes/test/fixtures"
	imageutils "k8s.io/kubernetes/test/utils/image"

	// Feature and environment labels must be defined before any test registers.
	_ "k8s.io/kubernetes/test/e2e/feature"

	// The tests this binary runs: sig-network's own (NetworkPolicy's are a
	// package of their own) and the common network ones.
	_ "k8s.io/kubernetes/test/e2e/common/network"
	_ "k8s.io/kubernetes/test/e2e/network"
	_ "k8s.io/kubernetes/test/e2e/network/netpol"

	// Framework extensions the upstream binary installs (failure dumps,
	// metrics grabbing, node readiness checks, object formatting).
	_ "k8s.io/kubernetes/test/e2e/framework/debug/init"
	_ "k8s.io/kubernetes/test/e2e/framework/metrics/init"
	_ "k8s.io/kubernetes/test/e2e/framework/node/init"
	_ "k8s.io/kubernetes/test/utils/format"
)

// suiteImages are the images the network tests run, by the names the
// harness builds them under (it has no registry to pull them from).
var suiteImages = map[string]imageutils.ImageID{
	"agnhost":                imageutils.Agnhost,
	"busybox":                imageutils.BusyBox,
	"distroless-iptables":    imageutils.DistrolessIptables,
	"httpd":                  imageutils.Httpd,
	"jessie-dnsutils":        imageutils.JessieDnsutils,
	"nginx":                  imageutils.Nginx,
	"pause":                  imageutils.Pause,
	"regression-issue-74839": imageutils.RegressionIssue74839,
}

func TestMain(m *testing.M) {
	showVersion := flag.CommandLine.Bool("version", false, "Print the Kubernetes version the suite was built from, then exit.")
	networkImages := flag.CommandLine.Bool("network-images", false, "Print the images the network tests run (a subset of --list-images, by name), one \"NAME REFERENCE\" a line, then exit.")
	config.CopyFlags(config.Flags, flag.CommandLine)
	framework.RegisterCommonFlags(flag.CommandLine)
	framework.RegisterClusterFlags(flag.CommandLine)
	flag.Parse()

	if *showVersion {
		fmt.Println(version.Get())
		os.Exit(0)
	}
	if *networkImages {
		for name, id := range suiteImages {
			fmt.Println(name, imageutils.GetE2EImage(id))
		}
		os.Exit(0)
	}
	if flag.CommandLine.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "unexpected arguments: %v\n", flag.CommandLine.Args())
		os.Exit(2)
	}

	// Manifests and fixtures the tests read come from the files embedded in
	// the binary, so it needs no Kubernetes source tree beside it.
	testfiles.AddFileSource(e2etestingmanifests.GetE2ETestingManifestsFS())
	testfiles.AddFileSource(testfixtures.GetTestFixturesFS())
	framework.AfterReadingAllFlags(&framework.TestContext)

	os.Exit(m.Run())
}

// TestE2E runs the registered Ginkgo specs selected by the focus/skip flags.
func TestE2E(t *testing.T) {
	e2e.RunE2ETests(t)
}
