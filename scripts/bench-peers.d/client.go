// The WebSocket client shared by both protocols, the Target interface each server implements,
// and the small helpers both use (HS256 client tokens, field scanning in JSON text).

package main

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// Target is one server under test. Every scenario is written once against it.
type Target interface {
	// Open connects a new client for user and returns once it receives on its own
	// address/channel (signalpost: `synced`; Centrifugo: the reply to subscribing its channel).
	// Deliveries go to sink from then on.
	Open(user string, sink Sink) (*Client, error)
	// Join makes c receive the shared channel name (signalpost: a bind over the HTTP API, then
	// the client's `bound` event; Centrifugo: a client subscribe and its reply).
	Join(c *Client, name string, api *HTTPConn) error
	// Own is the publish destination of c's own address/channel; Shared that of a channel name.
	Own(c *Client) string
	Shared(name string) string
	// Publish sends msgs in one request: the single-message endpoint for one, the batch
	// endpoint for more. Any message not accepted is an error.
	Publish(api *HTTPConn, msgs []Msg) error
	// Resume reconnects c's identity with its position and returns once the missed messages
	// were handed to sink, with whether the server says it recovered them.
	Resume(c *Client, sink Sink) (*Client, bool, error)
	// API is a new keep-alive connection to the server's HTTP API.
	API() *HTTPConn
}

// Msg is one message to publish: a destination and a JSON payload.
type Msg struct {
	Dest    string
	Payload []byte
}

// Sink receives the deliveries of one client: the payload's sequence number and send time (µs).
type Sink interface {
	Deliver(seq, sentUs int64)
}

// nopSink drops deliveries (idle and setup clients receive none).
type nopSink struct{}

func (nopSink) Deliver(int64, int64) {}

// Client is one WebSocket connection of either protocol. A goroutine reads it: it answers
// pings, hands deliveries to the sink, and passes every other frame to ctl.
type Client struct {
	User string
	ws   *websocket.Conn
	wmu  sync.Mutex
	ctl  chan []byte
	sink Sink
	done chan struct{}
	err  error
	// dropped counts control frames nobody waited for (ctl full).
	dropped atomic.Int64

	// signalpost: identity and the cursor of the client's own address
	ID, ResumeToken string
	Cursor          int64
	// Centrifugo: the own channel and its stream position
	Channel string
	Epoch   string
	Offset  uint64
	nextID  uint32
}

var dialer = &websocket.Dialer{
	HandshakeTimeout: 20 * time.Second,
	ReadBufferSize:   4096,
	WriteBufferSize:  1024,
}

// dial opens a WebSocket and starts its reader; handle classifies each frame.
func dial(url, user string, sink Sink, handle func(c *Client, frame []byte)) (*Client, error) {
	ws, _, err := dialer.Dial(url, nil)
	if err != nil {
		return nil, err
	}
	c := &Client{User: user, ws: ws, ctl: make(chan []byte, 64), sink: sink, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for {
			_, data, err := ws.ReadMessage()
			if err != nil {
				c.err = err
				return
			}
			handle(c, data)
		}
	}()
	return c, nil
}

// control passes a frame to whoever waits in next; frames nobody waits for are counted and dropped.
func (c *Client) control(frame []byte) {
	select {
	case c.ctl <- frame:
	default:
		c.dropped.Add(1)
	}
}

// send writes one text frame.
func (c *Client) send(text []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.ws.SetWriteDeadline(time.Now().Add(20 * time.Second))
	return c.ws.WriteMessage(websocket.TextMessage, text)
}

var errClosed = errors.New("connection closed")

// next waits for a control frame for which want is true; others are skipped.
func (c *Client) next(timeout time.Duration, want func([]byte) bool) ([]byte, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		select {
		case f := <-c.ctl:
			if want(f) {
				return f, nil
			}
		case <-c.done:
			// drain what arrived before the close
			select {
			case f := <-c.ctl:
				if want(f) {
					return f, nil
				}
				continue
			default:
			}
			return nil, fmt.Errorf("%w: %v", errClosed, c.err)
		case <-deadline.C:
			return nil, fmt.Errorf("timed out after %v", timeout)
		}
	}
}

// Close drops the connection (no close handshake: the server sees the TCP connection go).
func (c *Client) Close() {
	c.ws.UnderlyingConn().Close()
	<-c.done
}

// token is an HS256 JWT for sub, valid for a day.
func token(secret, sub string) string {
	enc := base64.RawURLEncoding
	head := enc.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`))
	exp := time.Now().Add(24 * time.Hour).Unix()
	claims := enc.EncodeToString([]byte(`{"sub":"` + sub + `","exp":` + strconv.FormatInt(exp, 10) + `}`))
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(head + "." + claims))
	return head + "." + claims + "." + enc.EncodeToString(m.Sum(nil))
}

// payload is the JSON payload of message seq: {"bp_s":seq,"bp_t":<now µs>[,"pad":"x…"]}.
func payload(seq int64, pad int) []byte {
	b := make([]byte, 0, 48+pad)
	b = append(b, `{"bp_s":`...)
	b = strconv.AppendInt(b, seq, 10)
	b = append(b, `,"bp_t":`...)
	b = strconv.AppendInt(b, time.Now().UnixMicro(), 10)
	if pad > 0 {
		b = append(b, `,"pad":"`...)
		b = append(b, bytes.Repeat([]byte("x"), pad)...)
		b = append(b, '"')
	}
	return append(b, '}')
}

var (
	keySeq  = []byte(`"bp_s":`)
	keySent = []byte(`"bp_t":`)
)

// scanDeliveries hands every payload in text (one message, or a reply carrying many) to sink,
// in order of appearance; it returns how many it found.
func scanDeliveries(text []byte, sink Sink) int {
	n := 0
	for {
		i := bytes.Index(text, keySeq)
		if i < 0 {
			return n
		}
		text = text[i+len(keySeq):]
		seq, rest := leadingInt(text)
		sent := int64(0)
		if j := bytes.Index(rest, keySent); j >= 0 && j < 8 {
			sent, _ = leadingInt(rest[j+len(keySent):])
		}
		sink.Deliver(seq, sent)
		n++
		text = rest
	}
}

// leadingInt parses the non-negative integer at the start of b (after spaces).
func leadingInt(b []byte) (int64, []byte) {
	i := 0
	for i < len(b) && b[i] == ' ' {
		i++
	}
	v := int64(0)
	start := i
	for i < len(b) && b[i] >= '0' && b[i] <= '9' {
		v = v*10 + int64(b[i]-'0')
		i++
	}
	if i == start {
		return -1, b[i:]
	}
	return v, b[i:]
}

// jsonString returns the string value of the first "key": in text (no unescaping: ids only).
func jsonString(text []byte, key string) string {
	k := []byte(`"` + key + `":"`)
	i := bytes.Index(text, k)
	if i < 0 {
		return ""
	}
	rest := text[i+len(k):]
	j := bytes.IndexByte(rest, '"')
	if j < 0 {
		return ""
	}
	return string(rest[:j])
}

// jsonInt returns the integer value of the first "key": in text, or -1.
func jsonInt(text []byte, key string) int64 {
	k := []byte(`"` + key + `":`)
	i := bytes.Index(text, k)
	if i < 0 {
		return -1
	}
	v, _ := leadingInt(text[i+len(k):])
	return v
}
