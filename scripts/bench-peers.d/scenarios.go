// The scenarios, each written once against Target so that both servers are measured the same way.

package main

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Env is what a scenario runs with.
type Env struct {
	T   Target
	Pid int
	// Processes whose CPU counts as the server's too (the Redis a Centrifugo on the Redis
	// engine stores in).
	Helpers []int
	P       Params
	Tag     string // unique per invocation: user and channel names
}

// cpu is the server's CPU time so far, its helpers' included.
func (e *Env) cpu() float64 {
	t := cpuSeconds(e.Pid)
	for _, p := range e.Helpers {
		t += cpuSeconds(p)
	}
	return t
}

var scenarios = map[string]func(*Env) (Result, error){
	"idle":       idle,
	"fanout":     fanout,
	"latency":    latency,
	"publish1":   func(e *Env) (Result, error) { return publish(e, 1) },
	"publish100": func(e *Env) (Result, error) { return publish(e, e.P.Batch) },
	"setup":      setup,
	"recovery":   recovery,
}

// openMany opens n clients (users first..first+n-1) with conc in flight; sink(i) is client i's
// sink. It returns the clients in order and each one's setup time.
func openMany(e *Env, first, n, conc int, sink func(i int) Sink) ([]*Client, []time.Duration, error) {
	clients := make([]*Client, n)
	took := make([]time.Duration, n)
	var next atomic.Int64
	var firstErr error
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				mu.Lock()
				failed := firstErr != nil
				mu.Unlock()
				if failed {
					return
				}
				t0 := time.Now()
				c, err := e.T.Open(userName(e.Tag, first+i), sink(i))
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("client %d: %w", i, err)
					}
					mu.Unlock()
					return
				}
				took[i] = time.Since(t0)
				clients[i] = c
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		closeAll(clients)
		return nil, nil, firstErr
	}
	return clients, took, nil
}

func closeAll(clients []*Client) {
	var wg sync.WaitGroup
	for _, c := range clients {
		if c != nil {
			wg.Add(1)
			go func() { defer wg.Done(); c.Close() }()
		}
	}
	wg.Wait()
}

// idle: the server's RSS before and after opening N idle clients (each receiving on its own
// address/channel), divided by N; 100 clients are opened first to warm up the server.
func idle(e *Env) (Result, error) {
	warm, _, err := openMany(e, 1_000_000, 100, 20, func(int) Sink { return nopSink{} })
	if err != nil {
		return Result{}, err
	}
	defer closeAll(warm)
	time.Sleep(time.Second)
	before := rssBytes(e.Pid)
	n := e.P.IdleClients
	clients, _, err := openMany(e, 0, n, 100, func(int) Sink { return nopSink{} })
	if err != nil {
		return Result{}, err
	}
	time.Sleep(2 * time.Second)
	after := rssBytes(e.Pid)
	closeAll(clients)
	per := float64(after-before) / float64(n) / 1024
	return Result{
		Metrics: map[string]float64{"kib_per_conn": per, "clients": float64(n)},
		Detail: fmt.Sprintf("%d idle clients: %.1f KiB each (RSS %.1f → %.1f MiB)",
			n, per, float64(before)/mib, float64(after)/mib),
	}, nil
}

// fanout: N clients receive one channel; M messages are published to it in batches of 100;
// the clock runs from the first publish until every client has every message.
func fanout(e *Env) (Result, error) {
	n, m := e.P.FanoutClients, e.P.FanoutMessages
	var progress atomic.Int64
	checks := make([]*Checker, n)
	for i := range checks {
		checks[i] = NewChecker(0, 1, m, false, &progress)
	}
	clients, _, err := openMany(e, 0, n, 50, func(i int) Sink { return checks[i] })
	if err != nil {
		return Result{}, err
	}
	defer closeAll(clients)
	channel := "fan-" + e.Tag
	// Join with 16 workers, each with its own API connection (signalpost binds over HTTP).
	var next atomic.Int64
	errs := make(chan error, 16)
	var wg sync.WaitGroup
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			api := e.T.API()
			defer api.Close()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := e.T.Join(clients[i], channel, api); err != nil {
					errs <- fmt.Errorf("join client %d: %w", i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return Result{}, err
	}
	api := e.T.API()
	defer api.Close()
	dest := e.T.Shared(channel)
	start := time.Now()
	failed := 0
	for sent := 0; sent < m; {
		k := min(100, m-sent)
		msgs := make([]Msg, k)
		for j := range msgs {
			msgs[j] = Msg{Dest: dest, Payload: payload(int64(sent+j), 0)}
		}
		if err := e.T.Publish(api, msgs); err != nil {
			fmt.Printf("  fanout publish failed: %v\n", err)
			failed += k
		}
		sent += k
	}
	waitProgress(&progress, int64(n*m), 20*time.Second)
	secs := time.Since(start).Seconds()
	var t Tally
	for _, c := range checks {
		t.Add(c)
	}
	rate := float64(t.Got) / secs
	return Result{
		Metrics:    map[string]float64{"deliveries_per_s": rate, "secs": secs, "delivered": float64(t.Got)},
		Violations: t.Violations() + failed,
		Detail: fmt.Sprintf("%d clients × %d messages: %.0f deliveries/s (%d in %.2f s); %s",
			n, m, rate, t.Got, secs, t),
	}, nil
}

// latency: open loop at R msg/s for S seconds; message i goes to client i mod N's own
// address/channel and carries its send time; enqueue→delivery percentiles, and the server's
// CPU time over the run.
func latency(e *Env) (Result, error) {
	n := e.P.LatencyClients
	total := int(float64(e.P.LatencyRate) * e.P.LatencySeconds)
	var progress atomic.Int64
	checks := make([]*Checker, n)
	for i := range checks {
		count := total / n
		if i < total%n {
			count++
		}
		checks[i] = NewChecker(int64(i), int64(n), count, true, &progress)
	}
	clients, _, err := openMany(e, 0, n, 50, func(i int) Sink { return checks[i] })
	if err != nil {
		return Result{}, err
	}
	defer closeAll(clients)
	dests := make([]string, n)
	for i, c := range clients {
		dests[i] = e.T.Own(c)
	}
	time.Sleep(500 * time.Millisecond)
	cpu0 := e.cpu()
	interval := time.Second / time.Duration(e.P.LatencyRate)
	senders := e.P.LatencySenders
	var failed atomic.Int64
	var lateMax atomic.Int64
	var wg sync.WaitGroup
	reqs := make([][]int64, senders) // each publish request's duration, µs
	// Each sender's connection is open before the clock starts: the scenario measures
	// enqueue→delivery, not TCP connects (sixteen dials at the first due times held the first
	// requests of either server for up to 10–25 ms).
	apis := make([]*HTTPConn, senders)
	for k := range apis {
		apis[k] = e.T.API()
		if err := apis[k].Open(); err != nil {
			return Result{}, err
		}
		defer apis[k].Close()
	}
	start := time.Now()
	for k := 0; k < senders; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			api := apis[k]
			for i := k; i < total; i += senders {
				due := start.Add(time.Duration(i) * interval)
				if d := time.Until(due); d > 0 {
					time.Sleep(d)
				} else if late := -d.Microseconds(); late > lateMax.Load() {
					lateMax.Store(late)
				}
				// seq = i: client i mod n expects i, i+n, i+2n, …
				t0 := time.Now()
				if err := e.T.Publish(api, []Msg{{Dest: dests[i%n], Payload: payload(int64(i), 0)}}); err != nil {
					failed.Add(1)
				}
				took := time.Since(t0).Microseconds()
				reqs[k] = append(reqs[k], took)
				if slowUs > 0 && took > slowUs {
					fmt.Fprintf(os.Stderr, "%s slow request: seq %d, %.2f ms, sent at %d µs\n", slowTag, i, float64(took)/1000, t0.UnixMicro())
				}
			}
		}()
	}
	wg.Wait()
	sentRate := float64(total) / time.Since(start).Seconds()
	waitProgress(&progress, int64(total), 10*time.Second)
	cpu := e.cpu() - cpu0
	var t Tally
	var all []int64
	for _, c := range checks {
		t.Add(c)
		all = append(all, c.latencies...)
	}
	sortInts(all)
	ms := func(q float64) float64 { return float64(percentile(all, q)) / 1000 }
	maxMs := 0.0
	if len(all) > 0 {
		maxMs = float64(all[len(all)-1]) / 1000
	}
	var req []int64
	for _, r := range reqs {
		req = append(req, r...)
	}
	sortInts(req)
	reqP50, reqP99 := float64(percentile(req, 0.5))/1000, float64(percentile(req, 0.99))/1000
	return Result{
		Metrics: map[string]float64{
			"p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999), "max_ms": maxMs,
			"cpu_s": cpu, "sent_rate": sentRate, "messages": float64(total), "rate": float64(e.P.LatencyRate),
			"sender_late_max_ms": float64(lateMax.Load()) / 1000,
			"request_p50_ms":     reqP50, "request_p99_ms": reqP99,
		},
		Violations: t.Violations() + int(failed.Load()),
		Detail: fmt.Sprintf("%d msg/s for %.0f s to %d clients (sent %.0f/s, %d failed): p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms, max %.2f ms; publish request p50 %.2f ms p99 %.2f ms; server CPU %.2f s; %s",
			e.P.LatencyRate, e.P.LatencySeconds, n, sentRate, failed.Load(), ms(0.5), ms(0.99), ms(0.999), maxMs, reqP50, reqP99, cpu, t),
	}, nil
}

// publish: messages/s accepted over C keep-alive HTTP connections for S seconds, batch
// messages per request (1: the single-message endpoint), spread over 1 000 channels/addresses
// that nobody receives.
func publish(e *Env, batch int) (Result, error) {
	conns := e.P.PublishConns
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	cpu0 := e.cpu()
	start := time.Now()
	deadline := start.Add(time.Duration(e.P.PublishSeconds * float64(time.Second)))
	dests := make([]string, e.P.PublishChannels)
	for i := range dests {
		dests[i] = e.T.Shared(fmt.Sprintf("p-%s-%d", e.Tag, i))
	}
	for k := 0; k < conns; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			api := e.T.API()
			defer api.Close()
			msgs := make([]Msg, batch)
			i := k * 7919
			for time.Now().Before(deadline) {
				for j := range msgs {
					msgs[j] = Msg{Dest: dests[i%len(dests)], Payload: payload(int64(i), 0)}
					i++
				}
				if err := e.T.Publish(api, msgs); err != nil {
					failed.Add(int64(batch))
					firstErr.CompareAndSwap(nil, err.Error())
				} else {
					ok.Add(int64(batch))
				}
			}
		}()
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	cpu := e.cpu() - cpu0
	rate := float64(ok.Load()) / secs
	detail := fmt.Sprintf("batch %d, %d connections: %.0f messages/s (%d in %.1f s, %d refused); server CPU %.1f s",
		batch, conns, rate, ok.Load(), secs, failed.Load(), cpu)
	if err := firstErr.Load(); err != nil {
		detail += fmt.Sprintf("; first refusal: %v", err)
	}
	return Result{
		Metrics:    map[string]float64{"msgs_per_s": rate, "cpu_s": cpu},
		Violations: int(failed.Load()),
		Detail:     detail,
	}, nil
}

// setup: N clients connect with C in flight, each until it receives on its own
// address/channel; connections set up per second, and each one's time.
func setup(e *Env) (Result, error) {
	n := e.P.SetupClients
	start := time.Now()
	clients, took, err := openMany(e, 0, n, e.P.SetupConcurrency, func(int) Sink { return nopSink{} })
	if err != nil {
		return Result{}, err
	}
	secs := time.Since(start).Seconds()
	closeAll(clients)
	us := make([]int64, len(took))
	for i, d := range took {
		us[i] = d.Microseconds()
	}
	sortInts(us)
	rate := float64(n) / secs
	p50, p99 := float64(percentile(us, 0.5))/1000, float64(percentile(us, 0.99))/1000
	return Result{
		Metrics: map[string]float64{"setups_per_s": rate, "p50_ms": p50, "p99_ms": p99},
		Detail: fmt.Sprintf("%d clients, %d at a time: %.0f setups/s (%.2f s), each p50 %.1f ms p99 %.1f ms",
			n, e.P.SetupConcurrency, rate, secs, p50, p99),
	}, nil
}

// recovery: a client receiving on its own address/channel disconnects; N messages (with ~64
// bytes of padding) are published to it in batches of 1 000; it reconnects with its position.
// How many it got back, the time from reconnecting until it has them, and the server's RSS
// growth (filling, and the peak during the recovery over the RSS before it).
func recovery(e *Env) (Result, error) {
	n := e.P.RecoveryMessages
	c, err := e.T.Open(userName(e.Tag, 0), nopSink{})
	if err != nil {
		return Result{}, err
	}
	c.Close()
	api := e.T.API()
	defer api.Close()
	rss0 := rssBytes(e.Pid)
	dest := e.T.Own(c)
	for sent := 0; sent < n; {
		k := min(1000, n-sent)
		msgs := make([]Msg, k)
		for j := range msgs {
			msgs[j] = Msg{Dest: dest, Payload: payload(int64(sent+j), 64)}
		}
		if err := e.T.Publish(api, msgs); err != nil {
			return Result{}, fmt.Errorf("filling: %w", err)
		}
		sent += k
	}
	time.Sleep(500 * time.Millisecond)
	rss1 := rssBytes(e.Pid)
	var progress atomic.Int64
	check := NewChecker(0, 1, n, false, &progress)
	stop := make(chan struct{})
	peak := rssPeak(e.Pid, stop)
	start := time.Now()
	r, recovered, err := e.T.Resume(c, check)
	if err != nil {
		close(stop)
		return Result{}, fmt.Errorf("resume: %w", err)
	}
	secs := time.Since(start).Seconds()
	close(stop)
	grew := float64(<-peak-rss1) / mib
	filled := float64(rss1-rss0) / mib
	// Whatever is still in flight after the server says it is done does not count as recovered.
	got := check.got
	r.Close()
	var t Tally
	t.Add(check)
	verdict := t.String()
	if !recovered {
		verdict = fmt.Sprintf("the server said it could not recover (its documented answer past its limits; not counted as a violation): %d of %d delivered", t.Got, t.Expected)
	}
	res := Result{
		Metrics: map[string]float64{
			"got": float64(got), "secs": secs, "rss_growth_mib": grew, "fill_growth_mib": filled,
			"recovered": b2f(recovered), "messages": float64(n),
		},
		Detail: fmt.Sprintf("%d missed: got %d in %.2f s (server says recovered: %v), RSS %+.1f MiB during the recovery (%+.1f MiB while filling); %s",
			n, got, secs, recovered, grew, filled, verdict),
	}
	// A server that says it did not recover (Centrifugo past its limits) loses the messages
	// openly, which is its documented behaviour, not a violation; a server that claims to have
	// recovered must deliver every message once and in order.
	if recovered {
		res.Violations = t.Violations()
	} else {
		res.Violations = t.Dup + t.Disorder + t.Stray
	}
	return res, nil
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
