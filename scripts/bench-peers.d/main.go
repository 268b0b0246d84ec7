// Command bench-peers is the one load generator of scripts/bench-peers: it drives signalpost
// (Socket.IO v4 over WebSocket + its HTTP server API) and Centrifugo v6 (its JSON client protocol
// over WebSocket + its HTTP server API) through the same scenarios, measured the same way, and
// checks every delivery (none lost, none twice, in order).
//
//	bench-peers run    --server signalpost|centrifugo --url http://127.0.0.1:PORT --pid PID --scenario NAME ...
//	bench-peers report --in results.jsonl [--doc docs/benchmarks.md] [--svg docs/bench-peers.svg] ...
//	bench-peers disk   [--dir /tmp]
//
// `run` measures one scenario against one running server (the script starts each server fresh
// for each scenario) and appends one JSON line to --out. `report` takes the medians over the
// runs, prints the markdown table with the ratios signalpost / Centrifugo, and writes the SVG
// chart and the docs section.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "run":
		runCmd(os.Args[2:])
	case "report":
		reportCmd(os.Args[2:])
	case "disk":
		diskCmd(os.Args[2:])
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: bench-peers run|report|disk [flags] (bench-peers run -h)")
	os.Exit(2)
}

// Params are the sizes of the scenarios; --quick shrinks them for a short development run.
type Params struct {
	IdleClients      int
	FanoutClients    int
	FanoutMessages   int
	LatencyClients   int
	LatencyRate      int
	LatencySeconds   float64
	LatencySenders   int
	PublishConns     int
	PublishSeconds   float64
	PublishChannels  int
	Batch            int
	SetupClients     int
	SetupConcurrency int
	RecoveryMessages int
}

func fullParams() Params {
	return Params{
		IdleClients: 10000, FanoutClients: 1000, FanoutMessages: 1000,
		LatencyClients: 1000, LatencyRate: 1000, LatencySeconds: 10, LatencySenders: 16,
		PublishConns: 64, PublishSeconds: 10, PublishChannels: 1000, Batch: 100,
		SetupClients: 5000, SetupConcurrency: 50, RecoveryMessages: 100000,
	}
}

func quickParams() Params {
	p := fullParams()
	p.IdleClients = 2000
	p.FanoutClients, p.FanoutMessages = 300, 300
	p.LatencyClients, p.LatencySeconds = 300, 3
	p.PublishSeconds = 3
	p.SetupClients = 1000
	p.RecoveryMessages = 20000
	return p
}

// Result is one scenario measured once against one server: a line of the results file.
type Result struct {
	Server     string             `json:"server"` // signalpost, centrifugo, centrifugo-raised or centrifugo-redis
	Scenario   string             `json:"scenario"`
	Run        int                `json:"run"`
	Quick      bool               `json:"quick"`
	Metrics    map[string]float64 `json:"metrics"`
	Violations int                `json:"violations"` // lost + duplicated + out of order + failed requests
	Detail     string             `json:"detail"`
	Time       string             `json:"time"`
}

func runCmd(args []string) {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	server := fs.String("server", "", "signalpost or centrifugo")
	label := fs.String("label", "", "the name results are filed under (default: --server)")
	url := fs.String("url", "", "the server's base URL, http://127.0.0.1:PORT")
	pid := fs.Int("pid", 0, "the server's process id (for RSS and CPU from /proc)")
	helper := fs.Int("helper-pid", 0, "a process whose CPU counts as the server's too (Centrifugo's Redis)")
	scenario := fs.String("scenario", "", "idle, fanout, latency, publish1, publish100, setup or recovery")
	apiKey := fs.String("api-key", "", "the server's HTTP API key")
	secret := fs.String("token-secret", "", "the HS256 secret of client tokens")
	run := fs.Int("run", 1, "run number (for the results file)")
	quick := fs.Bool("quick", false, "smaller scenarios for a short run")
	idleClients := fs.Int("idle-clients", 0, "clients of the idle scenario (default 10 000; 2 000 with --quick)")
	latencyRate := fs.Int("latency-rate", 0, "messages per second of the latency scenario (default 1 000)")
	out := fs.String("out", "", "append the result as a JSON line to this file")
	slowMs := fs.Float64("slow-ms", 0, "print each delivery (and latency-scenario publish request) slower than this, with its sequence number: message i of the latency scenario is due i/rate s after its start (0: none)")
	fs.Parse(args)
	slowUs = int64(*slowMs * 1000)
	if *server == "" || *url == "" || *scenario == "" || *pid == 0 {
		fs.Usage()
		os.Exit(2)
	}
	if *label == "" {
		*label = *server
	}
	slowTag = fmt.Sprintf("%-18s", *label)
	p := fullParams()
	if *quick {
		p = quickParams()
	}
	if *idleClients > 0 {
		p.IdleClients = *idleClients
	}
	if *latencyRate > 0 {
		p.LatencyRate = *latencyRate
	}
	var t Target
	switch *server {
	case "signalpost":
		t = NewSignalpost(*url, *apiKey, *secret)
	case "centrifugo":
		t = NewCentrifugo(*url, *apiKey, *secret)
	default:
		fatalf("unknown --server %q", *server)
	}
	env := &Env{T: t, Pid: *pid, P: p, Tag: fmt.Sprintf("r%d-%d", *run, time.Now().UnixNano()%1000000)}
	if *helper != 0 {
		env.Helpers = []int{*helper}
	}
	fn, ok := scenarios[*scenario]
	if !ok {
		fatalf("unknown --scenario %q", *scenario)
	}
	res, err := fn(env)
	if err != nil {
		fatalf("%s %s: %v", *label, *scenario, err)
	}
	res.Server, res.Scenario, res.Run, res.Quick = *label, *scenario, *run, *quick
	res.Time = time.Now().UTC().Format(time.RFC3339)
	fmt.Printf("%-18s %-10s %s\n", *label, *scenario, res.Detail)
	if res.Violations > 0 {
		fmt.Printf("%-18s %-10s DELIVERY CHECK FAILED: %d violations\n", *label, *scenario, res.Violations)
	}
	if *out != "" {
		f, err := os.OpenFile(*out, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			fatalf("%v", err)
		}
		line, _ := json.Marshal(res)
		f.Write(append(line, '\n'))
		f.Close()
	}
	if res.Violations > 0 {
		os.Exit(3)
	}
}

func fatalf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench-peers: "+format+"\n", a...)
	os.Exit(1)
}
