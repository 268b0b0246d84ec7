// `bench-peers report`: medians over the runs, the markdown table with the ratios
// signalpost / Centrifugo, the SVG chart, and the generated part of docs/benchmarks.md.

package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"strings"
)

// row is one line of the table: a metric of a scenario, and which way is better.
type row struct {
	short    string // for the chart
	label    string
	scenario string
	metric   string
	lower    bool // lower is better
	format   func(float64) string
}

func rows(p Params) []row {
	kib := func(v float64) string { return fmt.Sprintf("%.1f KiB", v) }
	ms := func(v float64) string { return fmt.Sprintf("%.2f ms", v) }
	sec := func(v float64) string { return fmt.Sprintf("%.2f s", v) }
	mb := func(v float64) string { return fmt.Sprintf("%+.1f MiB", v) }
	return []row{
		{"idle memory per connection", fmt.Sprintf("idle memory per connection, %s clients", thousands(p.IdleClients)), "idle", "kib_per_conn", true, kib},
		{"fan-out deliveries/s", fmt.Sprintf("fan-out, %s clients × %s messages", thousands(p.FanoutClients), thousands(p.FanoutMessages)), "fanout", "deliveries_per_s", false, rate("deliveries/s")},
		{"latency p50", fmt.Sprintf("enqueue→delivery p50, %s msg/s to %s clients", thousands(p.LatencyRate), thousands(p.LatencyClients)), "latency", "p50_ms", true, ms},
		{"latency p99", "enqueue→delivery p99", "latency", "p99_ms", true, ms},
		{"latency p99.9", "enqueue→delivery p99.9", "latency", "p999_ms", true, ms},
		{"server CPU in the latency run", fmt.Sprintf("server CPU for that latency run (%s messages)", thousands(int(float64(p.LatencyRate)*p.LatencySeconds))), "latency", "cpu_s", true, sec},
		{"single-message publishes/s", fmt.Sprintf("single-message publishes, %d keep-alive connections", p.PublishConns), "publish1", "msgs_per_s", false, rate("msg/s")},
		{"batched publishes/s", fmt.Sprintf("publishes in batches of %d", p.Batch), "publish100", "msgs_per_s", false, rate("msg/s")},
		{"connection setups/s", fmt.Sprintf("connection setups (connect + own address/channel), %s clients, %d at a time", thousands(p.SetupClients), p.SetupConcurrency), "setup", "setups_per_s", false, rate("/s")},
		{"recovery time (vs raised limits)", fmt.Sprintf("recovery of %s missed messages: time to have them all", thousands(p.RecoveryMessages)), "recovery", "secs", true, sec},
		{"recovery RSS growth (vs raised limits)", "recovery: server RSS growth during it", "recovery", "rss_growth_mib", true, mb},
		{"RSS growth while filling (vs raised)", fmt.Sprintf("recovery: server RSS growth while the %s were published", thousands(p.RecoveryMessages)), "recovery", "fill_growth_mib", true, mb},
	}
}

func rate(unit string) func(float64) string {
	return func(v float64) string {
		switch {
		case v >= 1e6:
			return fmt.Sprintf("%.2f M %s", v/1e6, unit)
		case v >= 1e4:
			return fmt.Sprintf("%.0f k %s", v/1e3, unit)
		case v >= 1e3:
			return fmt.Sprintf("%.1f k %s", v/1e3, unit)
		}
		return fmt.Sprintf("%.0f %s", v, unit)
	}
}

// thousands writes 10000 as "10 000".
func thousands(n int) string {
	s := fmt.Sprint(n)
	var b strings.Builder
	for i, r := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(' ')
		}
		b.WriteRune(r)
	}
	return b.String()
}

// stat is one metric of one server over the runs.
type stat struct {
	values     []float64
	violations int
	runs       int
}

func (s *stat) median() float64 {
	v := append([]float64(nil), s.values...)
	sort.Float64s(v)
	if len(v) == 0 {
		return math.NaN()
	}
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

func (s *stat) cell(format func(float64) string) string {
	if s == nil || len(s.values) == 0 {
		return "–"
	}
	out := format(s.median())
	if len(s.values) > 1 {
		v := append([]float64(nil), s.values...)
		sort.Float64s(v)
		lo, hi := format(v[0]), format(v[len(v)-1])
		// "(677 k – 972 k)" rather than repeating the unit of the median
		if i := strings.LastIndexByte(out, ' '); i > 0 {
			unit := out[i:]
			if strings.HasSuffix(lo, unit) && strings.HasSuffix(hi, unit) {
				lo, hi = strings.TrimSuffix(lo, unit), strings.TrimSuffix(hi, unit)
			}
		}
		out += fmt.Sprintf(" <sub>(%s – %s)</sub>", lo, hi)
	}
	if s.violations > 0 {
		out += fmt.Sprintf(" **⚠ %d delivery-check violations**", s.violations)
	}
	return out
}

// ratioCell is signalpost / Centrifugo with its reading, and the advantage for the chart
// (>1: signalpost better).
func ratioCell(r row, sp, cf *stat) (string, float64, bool) {
	if sp == nil || cf == nil || len(sp.values) == 0 || len(cf.values) == 0 {
		return "–", 0, false
	}
	a, b := sp.median(), cf.median()
	if strings.HasSuffix(r.metric, "growth_mib") {
		// RSS moves by a few hundred KiB on its own; a growth under 1 MiB is read as 1 MiB.
		a, b = math.Max(a, 1), math.Max(b, 1)
	}
	if b == 0 || math.IsNaN(a) || math.IsNaN(b) {
		return "–", 0, false
	}
	ratio := a / b
	adv := ratio
	if r.lower {
		adv = 1 / ratio
	}
	word := "better"
	switch {
	case adv > 0.98 && adv < 1.02:
		word = "even"
	case adv < 1:
		word = "worse"
	}
	text := fmt.Sprintf("%.2f (%s)", ratio, word)
	if ratio < 0.01 {
		text = fmt.Sprintf("%.4f (%s)", ratio, word)
	}
	if word == "worse" {
		text = "**" + text + "**"
	}
	return text, adv, true
}

type bar struct {
	label string
	adv   float64
	text  string
}

// results are the runs of one results file, per server/scenario/metric.
type results struct {
	stats       map[string]*stat
	failures    []string // runs whose delivery check failed
	runs        int
	quick       bool
	recoveredBy map[string][]string // server → "got of messages" per run
}

// get is the stat of one row for one server (nil when it did not run).
func (r *results) get(server string, row row) *stat {
	return r.stats[server+"/"+row.scenario+"/"+row.metric]
}

// readResults reads the JSON lines `bench-peers run` wrote.
func readResults(path string) *results {
	f, err := os.Open(path)
	if err != nil {
		fatalf("%v", err)
	}
	defer f.Close()
	out := &results{stats: map[string]*stat{}, recoveredBy: map[string][]string{}}
	runs := map[int]bool{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var r Result
		if json.Unmarshal(sc.Bytes(), &r) != nil {
			continue
		}
		runs[r.Run] = true
		out.quick = out.quick || r.Quick
		for k, v := range r.Metrics {
			key := r.Server + "/" + r.Scenario + "/" + k
			s := out.stats[key]
			if s == nil {
				s = &stat{}
				out.stats[key] = s
			}
			s.values = append(s.values, v)
			s.violations += r.Violations
			s.runs++
		}
		if r.Violations > 0 {
			out.failures = append(out.failures, fmt.Sprintf("run %d, %s, %s: %s", r.Run, r.Server, r.Scenario, r.Detail))
		}
		if r.Scenario == "recovery" {
			out.recoveredBy[r.Server] = append(out.recoveredBy[r.Server], fmt.Sprintf("%s of %s", thousands(int(r.Metrics["got"])), thousands(int(r.Metrics["messages"]))))
		}
	}
	out.runs = len(runs)
	return out
}

// params are the scenarios' parameters as run.
func (res *results) params() Params {
	p := fullParams()
	if res.quick {
		p = quickParams()
	}
	if c := res.stats["signalpost/idle/clients"]; c != nil && len(c.values) > 0 {
		p.IdleClients = int(c.values[0]) // as run (--idle-clients)
	}
	if c := res.stats["signalpost/latency/rate"]; c != nil && len(c.values) > 0 {
		p.LatencyRate = int(c.values[0]) // as run (--latency-rate)
	}
	return p
}

// mainTable is the table against Centrifugo's memory engine, and its bars for the chart.
func mainTable(res *results, p Params, version string) (string, []bar) {
	stats := res.stats
	var t strings.Builder
	fmt.Fprintf(&t, "| scenario | signalpost | %s | signalpost / Centrifugo |\n|---|---|---|---|\n", version)
	var bars []bar
	for _, r := range rows(p) {
		sp := res.get("signalpost", r)
		cf := res.get("centrifugo", r)
		cfCell := cf.cell(r.format)
		if r.scenario == "recovery" {
			// Centrifugo as configured for every scenario refuses to recover past its limits
			// (recovered: false, nothing delivered); the ratio is against the raised limits.
			raised := res.get("centrifugo-raised", r)
			def := stats["centrifugo/recovery/recovered"]
			got := stats["centrifugo/recovery/got"]
			if r.metric == "secs" {
				cfCell = "as configured: "
				if def != nil && def.median() < 1 {
					cfCell += fmt.Sprintf("not recovered (%s delivered)", thousands(int(got.median())))
				} else {
					cfCell += cf.cell(r.format)
				}
				cfCell += "; raised limits: " + raised.cell(r.format)
			} else if r.metric == "fill_growth_mib" {
				cfCell = "as configured: " + cf.cell(r.format) + "; raised limits: " + raised.cell(r.format)
			} else {
				cfCell = "raised limits: " + raised.cell(r.format)
			}
			cf = raised
		}
		spCell := sp.cell(r.format)
		if r.scenario == "recovery" && r.metric == "secs" {
			for _, who := range []string{"signalpost", "centrifugo-raised"} {
				if g := stats[who+"/recovery/got"]; g != nil && g.median() < float64(p.RecoveryMessages) {
					note := fmt.Sprintf(" (only %s delivered)", thousands(int(g.median())))
					if who == "signalpost" {
						spCell += note
					} else {
						cfCell += note
					}
				}
			}
		}
		text, adv, ok := ratioCell(r, sp, cf)
		fmt.Fprintf(&t, "| %s | %s | %s | %s |\n", r.label, spCell, cfCell, text)
		if ok {
			bars = append(bars, bar{label: r.short, adv: adv, text: strings.Trim(text, "*")})
		}
	}
	return t.String(), bars
}

// durableTable is the table against Centrifugo on its Redis engine with every write fsynced
// (--durable-peer): the rows of the scenarios it ran, beside signalpost's from the same runs;
// empty when it did not run.
func durableTable(res *results, p Params, version string) string {
	var d strings.Builder
	for _, r := range rows(p) {
		dp := res.get(durablePeer, r)
		if dp == nil || len(dp.values) == 0 {
			continue
		}
		sp := res.get("signalpost", r)
		text, _, _ := ratioCell(r, sp, dp)
		fmt.Fprintf(&d, "| %s | %s | %s | %s |\n", r.label, sp.cell(r.format), dp.cell(r.format), text)
	}
	if d.Len() == 0 {
		return ""
	}
	return fmt.Sprintf("Against %s on its **Redis engine, every write fsynced** (Redis 7 with `appendonly yes`, `appendfsync always`: a publish is answered once its history entry is on disk, as signalpost's are; the server CPU includes Redis's):\n\n| scenario | signalpost | %s + Redis | signalpost / that |\n|---|---|---|---|\n", version, version) + d.String()
}

// checksText says what the delivery checks found, and what each recovery run got.
func checksText(res *results) string {
	var checks string
	if len(res.failures) == 0 {
		checks = "Every delivery was checked per client (fan-out, latency, recovery): none lost, none twice, all in order, in every run."
	} else {
		checks = "**Delivery-check failures** (a failed run; its figures are in the medians above, marked ⚠):\n\n"
		for _, f := range res.failures {
			checks += "- " + f + "\n"
		}
	}
	recov := ""
	for _, s := range []string{"signalpost", "centrifugo", "centrifugo-raised"} {
		if v := res.recoveredBy[s]; len(v) > 0 {
			recov += fmt.Sprintf("%s: %s; ", s, strings.Join(v, ", "))
		}
	}
	if recov != "" {
		checks += "\n\nRecovered per run — " + strings.TrimSuffix(recov, "; ") + "."
	}
	return checks
}

func reportCmd(args []string) {
	fs := flag.NewFlagSet("report", flag.ExitOnError)
	in := fs.String("in", "", "the results file (JSON lines from bench-peers run)")
	doc := fs.String("doc", "", "write the generated section into this markdown file (between the bench-peers markers)")
	svg := fs.String("svg", "", "write the chart of the ratios to this SVG file")
	svgRef := fs.String("svg-ref", "bench-peers.svg", "how the docs refer to the SVG")
	command := fs.String("command", "scripts/bench-peers", "the command that produced the results (for the docs)")
	machine := fs.String("machine", "", "a line on the machine and its load (for the docs)")
	version := fs.String("centrifugo", "Centrifugo v6.9.1", "the Centrifugo build measured")
	fs.Parse(args)
	res := readResults(*in)
	p := res.params()
	table, bars := mainTable(res, p, *version)
	durable := durableTable(res, p, *version)
	checks := checksText(res)

	fmt.Println()
	fmt.Println(table)
	if durable != "" {
		fmt.Println(durable)
	}
	fmt.Println(checks)

	if *svg != "" {
		title := fmt.Sprintf("signalpost vs %s, median of %d run(s)%s", *version, res.runs, dated(*machine))
		if err := os.WriteFile(*svg, []byte(chart(title, bars)), 0o644); err != nil {
			fatalf("%v", err)
		}
	}
	if *doc != "" {
		var b strings.Builder
		b.WriteString(beginMarker + "\n")
		fmt.Fprintf(&b, "Measured with `%s`: %s; median of %d run(s) per scenario, (min – max) beside it.\n\n", *command, *machine, res.runs)
		b.WriteString(table)
		if durable != "" {
			b.WriteString("\n" + durable)
		}
		b.WriteString("\n" + checks + "\n\n")
		fmt.Fprintf(&b, "![signalpost / Centrifugo per scenario](%s)\n", *svgRef)
		b.WriteString(endMarker + "\n")
		if err := writeSection(*doc, b.String()); err != nil {
			fatalf("%v", err)
		}
	}
}

// durablePeer is the label of Centrifugo on the Redis engine with fsync always.
const durablePeer = "centrifugo-redis"

const (
	beginMarker = "<!-- bench-peers:begin — written by scripts/bench-peers; edits inside are overwritten -->"
	endMarker   = "<!-- bench-peers:end -->"
)

// writeSection replaces the text between the markers in path (appending a section when the
// markers are not there yet).
func writeSection(path, section string) error {
	old, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	s := string(old)
	i := strings.Index(s, "<!-- bench-peers:begin")
	j := strings.Index(s, endMarker)
	if i >= 0 && j > i {
		rest := strings.TrimPrefix(s[j+len(endMarker):], "\n")
		s = s[:i] + section + rest
	} else {
		s = strings.TrimRight(s, "\n") + "\n\n## Side by side with Centrifugo\n\n" + section
	}
	return os.WriteFile(path, []byte(s), 0o644)
}

// dated is ", <date>" when the machine line starts with a YYYY-MM-DD date.
func dated(machine string) string {
	if len(machine) >= 10 && machine[4] == '-' && machine[7] == '-' {
		return ", " + machine[:10]
	}
	return ""
}
