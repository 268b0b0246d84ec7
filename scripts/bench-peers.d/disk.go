// `bench-peers disk`: how long one small synchronous write takes on the disk the servers write
// to, at the pace of the latency scenario. signalpost answers each publish after such a write
// (its mailbox log: 4 KiB blocks, O_DIRECT and O_DSYNC), so this is the floor of its latency on
// the day, and on a virtual disk it changes from hour to hour. The script prints it beside each
// table.

package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"time"
)

func diskCmd(args []string) {
	fs := flag.NewFlagSet("disk", flag.ExitOnError)
	dir := fs.String("dir", os.TempDir(), "a folder on the disk to probe")
	writes := fs.Int("writes", 2000, "how many writes")
	every := fs.Duration("every", 800*time.Microsecond, "the pause between writes (the latency scenario sends one message a millisecond)")
	fs.Parse(args)
	p50, p99, direct, err := probeDisk(*dir, *writes, *every)
	if err != nil {
		fatalf("disk probe: %v", err)
	}
	how := "O_DIRECT|O_DSYNC"
	if !direct {
		how = "O_DSYNC (no direct I/O here)"
	}
	fmt.Printf("a 4 KiB %s write every %v: p50 %.2f ms, p99 %.2f ms (%d writes)\n", how, *every, p50, p99, *writes)
}

// probeDisk writes 4 KiB blocks one at a time into a preallocated file in dir, each written
// through to the disk before the call returns, and gives the p50 and p99 of one write in ms.
func probeDisk(dir string, writes int, every time.Duration) (p50, p99 float64, direct bool, err error) {
	const block = 4096
	const blocks = 1024 // 4 MiB, reused in turn: the writes overwrite blocks the file has
	f, err := os.CreateTemp(dir, "bench-peers-disk-*")
	if err != nil {
		return 0, 0, false, err
	}
	path := f.Name()
	defer os.Remove(path)
	if _, err = f.Write(make([]byte, block*blocks)); err == nil {
		err = f.Sync()
	}
	f.Close()
	if err != nil {
		return 0, 0, false, err
	}
	w, err := os.OpenFile(filepath.Clean(path), os.O_WRONLY|syscall.O_DIRECT|syscall.O_DSYNC, 0)
	direct = err == nil
	if !direct {
		if w, err = os.OpenFile(path, os.O_WRONLY|syscall.O_DSYNC, 0); err != nil {
			return 0, 0, false, err
		}
	}
	defer w.Close()
	// Direct writes need an aligned buffer: an anonymous mapping is page-aligned.
	buf, err := syscall.Mmap(-1, 0, block, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		return 0, 0, false, err
	}
	defer syscall.Munmap(buf)
	for i := range buf {
		buf[i] = byte(i)
	}
	lat := make([]float64, 0, writes)
	for i := 0; i < writes; i++ {
		t := time.Now()
		if _, err := w.WriteAt(buf, int64(i%blocks)*block); err != nil {
			return 0, 0, direct, err
		}
		lat = append(lat, float64(time.Since(t).Microseconds())/1000)
		time.Sleep(every)
	}
	sort.Float64s(lat)
	at := func(q float64) float64 { return lat[min(len(lat)-1, int(q*float64(len(lat))))] }
	return at(0.5), at(0.99), direct, nil
}
