// A minimal keep-alive HTTP/1.1 client for the servers' HTTP APIs: one TCP connection, one
// request at a time, prebuilt headers. Lighter on CPU than net/http, which matters when the load
// generator shares two cores with the server it measures; it is used the same way for both servers.

package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// HTTPConn is one keep-alive connection to a server; it redials after an error.
type HTTPConn struct {
	addr   string // host:port
	header string // extra header lines, each ending in \r\n
	c      net.Conn
	r      *bufio.Reader
	w      *bufio.Writer
}

// NewHTTPConn returns a connection to baseURL (http://host:port) that sends header (a
// "Name: value" line, or "") with every request. It dials on first use.
func NewHTTPConn(baseURL, header string) *HTTPConn {
	h := &HTTPConn{addr: strings.TrimSuffix(strings.TrimPrefix(baseURL, "http://"), "/")}
	if header != "" {
		h.header = header + "\r\n"
	}
	return h
}

func (h *HTTPConn) dial() error {
	c, err := net.DialTimeout("tcp", h.addr, 5*time.Second)
	if err != nil {
		return err
	}
	c.(*net.TCPConn).SetNoDelay(true)
	h.c, h.r, h.w = c, bufio.NewReaderSize(c, 16<<10), bufio.NewWriterSize(c, 16<<10)
	return nil
}

// Open dials now if not connected, so that the first request does not (the latency scenario
// opens its senders' connections before it starts the clock).
func (h *HTTPConn) Open() error {
	if h.c != nil {
		return nil
	}
	return h.dial()
}

// Close closes the connection.
func (h *HTTPConn) Close() {
	if h.c != nil {
		h.c.Close()
		h.c = nil
	}
}

// Do sends one request and returns the status and body. A transport error closes the
// connection (the next call redials) and is returned; the request is not retried.
func (h *HTTPConn) Do(method, path string, body []byte) (int, []byte, error) {
	if h.c == nil {
		if err := h.dial(); err != nil {
			return 0, nil, err
		}
	}
	h.c.SetDeadline(time.Now().Add(60 * time.Second))
	status, resp, err := h.do(method, path, body)
	if err != nil {
		h.Close()
	}
	return status, resp, err
}

func (h *HTTPConn) do(method, path string, body []byte) (int, []byte, error) {
	w := h.w
	w.WriteString(method)
	w.WriteByte(' ')
	w.WriteString(path)
	w.WriteString(" HTTP/1.1\r\nHost: ")
	w.WriteString(h.addr)
	w.WriteString("\r\nContent-Type: application/json\r\n")
	w.WriteString(h.header)
	w.WriteString("Content-Length: ")
	w.WriteString(strconv.Itoa(len(body)))
	w.WriteString("\r\n\r\n")
	w.Write(body)
	if err := w.Flush(); err != nil {
		return 0, nil, err
	}
	line, err := h.r.ReadSlice('\n')
	if err != nil {
		return 0, nil, err
	}
	// "HTTP/1.1 200 OK"
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return 0, nil, fmt.Errorf("bad status line %q", line)
	}
	status, err := strconv.Atoi(string(line[9:12]))
	if err != nil {
		return 0, nil, fmt.Errorf("bad status line %q", line)
	}
	length, chunked, closeAfter := -1, false, false
	for {
		line, err := h.r.ReadSlice('\n')
		if err != nil {
			return 0, nil, err
		}
		l := bytes.TrimRight(line, "\r\n")
		if len(l) == 0 {
			break
		}
		name, value, ok := bytes.Cut(l, []byte(":"))
		if !ok {
			continue
		}
		value = bytes.TrimSpace(value)
		switch strings.ToLower(string(name)) {
		case "content-length":
			length, _ = strconv.Atoi(string(value))
		case "transfer-encoding":
			chunked = bytes.Contains(bytes.ToLower(value), []byte("chunked"))
		case "connection":
			closeAfter = bytes.EqualFold(value, []byte("close"))
		}
	}
	var resp []byte
	switch {
	case chunked:
		resp, err = h.readChunked()
	case length >= 0:
		resp = make([]byte, length)
		_, err = io.ReadFull(h.r, resp)
	default:
		resp, err = io.ReadAll(h.r)
		closeAfter = true
	}
	if err != nil {
		return 0, nil, err
	}
	if closeAfter {
		h.Close()
	}
	return status, resp, nil
}

func (h *HTTPConn) readChunked() ([]byte, error) {
	var out []byte
	for {
		line, err := h.r.ReadSlice('\n')
		if err != nil {
			return nil, err
		}
		sz := bytes.TrimRight(line, "\r\n")
		if i := bytes.IndexByte(sz, ';'); i >= 0 {
			sz = sz[:i]
		}
		n, err := strconv.ParseInt(string(sz), 16, 64)
		if err != nil {
			return nil, fmt.Errorf("bad chunk size %q", line)
		}
		if n == 0 {
			// trailers until the blank line
			for {
				l, err := h.r.ReadSlice('\n')
				if err != nil {
					return nil, err
				}
				if len(bytes.TrimRight(l, "\r\n")) == 0 {
					return out, nil
				}
			}
		}
		start := len(out)
		out = append(out, make([]byte, n)...)
		if _, err := io.ReadFull(h.r, out[start:]); err != nil {
			return nil, err
		}
		if _, err := h.r.Discard(2); err != nil {
			return nil, err
		}
	}
}

// errStatus is a non-success answer, with the start of its body.
func errStatus(status int, body []byte) error {
	if len(body) > 300 {
		body = body[:300]
	}
	return errors.New(strconv.Itoa(status) + " " + string(body))
}
