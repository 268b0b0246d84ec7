// Delivery checking (every message once, in order, none lost) and the small statistics the
// scenarios report (percentiles, the server's RSS and CPU time from /proc).

package main

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// Checker is the Sink of one client that expects the sequence numbers it is told about, each
// once and in increasing order. Only the client's reader goroutine calls Deliver.
type Checker struct {
	seen      []uint8 // index: the sequence number's slot (see slot)
	first     int64   // slot = (seq - first) / stride
	stride    int64
	lastSeq   int64
	dup       int
	disorder  int
	stray     int
	got       int
	latencies []int64 // µs, when recording
	record    bool
	progress  *atomic.Int64
}

// slowUs: deliveries (and the latency scenario's publish requests) slower than this many µs
// are printed to stderr one by one, with their sequence number (`run --slow-ms`; 0: none).
var slowUs int64

// slowTag begins each of those lines: the server measured (`run --label`).
var slowTag string

// NewChecker expects seq = first, first+stride, … (count of them).
func NewChecker(first, stride int64, count int, record bool, progress *atomic.Int64) *Checker {
	return &Checker{seen: make([]uint8, count), first: first, stride: stride, lastSeq: -1, record: record, progress: progress}
}

func (c *Checker) Deliver(seq, sentUs int64) {
	now := time.Now().UnixMicro()
	if seq < c.first || (seq-c.first)%c.stride != 0 || (seq-c.first)/c.stride >= int64(len(c.seen)) {
		c.stray++
		return
	}
	slot := (seq - c.first) / c.stride
	switch {
	case c.seen[slot] > 0:
		c.dup++ // a repeat (counted once, not also as out of order)
	case seq < c.lastSeq:
		c.disorder++
	default:
		c.lastSeq = seq
	}
	if c.seen[slot] == 0 {
		c.got++
		if c.progress != nil {
			c.progress.Add(1)
		}
	}
	if c.seen[slot] < 255 {
		c.seen[slot]++
	}
	if c.record && sentUs > 0 {
		c.latencies = append(c.latencies, now-sentUs)
		if slowUs > 0 && now-sentUs > slowUs {
			fmt.Fprintf(os.Stderr, "%s slow delivery: seq %d, %.2f ms, sent at %d µs\n", slowTag, seq, float64(now-sentUs)/1000, sentUs)
		}
	}
}

// Tally is the delivery check over many clients.
type Tally struct {
	Expected, Got, Lost, Dup, Disorder, Stray int
}

func (t *Tally) Add(c *Checker) {
	t.Expected += len(c.seen)
	t.Got += c.got
	t.Lost += len(c.seen) - c.got
	t.Dup += c.dup
	t.Disorder += c.disorder
	t.Stray += c.stray
}

func (t Tally) Violations() int { return t.Lost + t.Dup + t.Disorder + t.Stray }

func (t Tally) String() string {
	if t.Violations() == 0 {
		return fmt.Sprintf("all %d deliveries checked: none lost, none twice, in order", t.Got)
	}
	return fmt.Sprintf("CHECK: %d of %d delivered, %d lost, %d twice, %d out of order, %d unexpected",
		t.Got, t.Expected, t.Lost, t.Dup, t.Disorder, t.Stray)
}

// waitProgress waits until progress reaches want, or it stops moving for stall.
func waitProgress(progress *atomic.Int64, want int64, stall time.Duration) {
	last, lastChange := progress.Load(), time.Now()
	for {
		n := progress.Load()
		if n >= want {
			return
		}
		if n != last {
			last, lastChange = n, time.Now()
		} else if time.Since(lastChange) > stall {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// percentile of sorted values (nearest rank).
func percentile(sorted []int64, q float64) int64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.999999) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return sorted[i]
}

func sortInts(v []int64) { sort.Slice(v, func(i, j int) bool { return v[i] < v[j] }) }

// rssBytes is the process's resident set (VmRSS) from /proc/<pid>/status.
func rssBytes(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		fatalf("reading the server's memory: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb * 1024
		}
	}
	return 0
}

// cpuSeconds is the process's user + system CPU time from /proc/<pid>/stat (clock ticks of
// 1/100 s, the Linux userland constant).
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		fatalf("reading the server's CPU time: %v", err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	// after "pid (comm) ": field 3 is f[0]; utime is field 14, stime field 15
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100
}

// rssPeak samples the RSS every 20 ms until stop is closed, and returns the highest.
func rssPeak(pid int, stop <-chan struct{}) <-chan int64 {
	out := make(chan int64, 1)
	go func() {
		peak := rssBytes(pid)
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				if r := rssBytes(pid); r > peak {
					peak = r
				}
				out <- peak
				return
			case <-t.C:
				if r := rssBytes(pid); r > peak {
					peak = r
				}
			}
		}
	}()
	return out
}

const mib = 1024 * 1024
