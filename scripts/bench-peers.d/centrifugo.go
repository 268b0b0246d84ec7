// Centrifugo v6 as a Target: its bidirectional JSON client protocol over WebSocket
// (/connection/websocket: `{"id":1,"connect":{"token":…}}`, `{"id":2,"subscribe":{…}}`,
// publications as `{"push":{"channel":…,"pub":{"data":…,"offset":…}}}`, ping `{}` → pong `{}`;
// several replies may share one frame, one per line) and its HTTP server API (/api/publish,
// /api/batch with the X-API-Key header).

package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Centrifugo drives a Centrifugo node.
type Centrifugo struct {
	base, apiKey, secret string
	wsURL                string
}

// NewCentrifugo returns the Target for the node at base (http://host:port).
func NewCentrifugo(base, apiKey, secret string) *Centrifugo {
	return &Centrifugo{
		base: base, apiKey: apiKey, secret: secret,
		wsURL: "ws://" + strings.TrimPrefix(base, "http://") + "/connection/websocket",
	}
}

func (s *Centrifugo) API() *HTTPConn { return NewHTTPConn(s.base, "X-API-Key: "+s.apiKey) }

var (
	cfPush = []byte(`{"push":`)
	cfPing = []byte("{}")
)

func cfHandle(c *Client, f []byte) {
	for len(f) > 0 {
		line := f
		if i := bytes.IndexByte(f, '\n'); i >= 0 {
			line, f = f[:i], f[i+1:]
		} else {
			f = nil
		}
		switch {
		case len(line) == 0:
		case bytes.Equal(line, cfPing):
			c.send(cfPing)
		case bytes.HasPrefix(line, cfPush) && bytes.Contains(line, []byte(`"pub":`)):
			scanDeliveries(line, c.sink)
		default:
			c.control(line)
		}
	}
}

// command sends {"id":N,<body>} and waits for the reply with that id.
func (s *Centrifugo) command(c *Client, body string, timeout time.Duration) ([]byte, error) {
	c.nextID++
	id := c.nextID
	prefix := []byte(`{"id":` + strconv.FormatUint(uint64(id), 10) + `,`)
	if err := c.send([]byte(string(prefix) + body + "}")); err != nil {
		return nil, err
	}
	r, err := c.next(timeout, func(f []byte) bool { return bytes.HasPrefix(f, prefix) })
	if err != nil {
		return nil, err
	}
	if bytes.HasPrefix(r[len(prefix):], []byte(`"error":`)) {
		return nil, fmt.Errorf("centrifugo: %s", r)
	}
	return r, nil
}

func (s *Centrifugo) connect(user string, sink Sink) (*Client, error) {
	c, err := dial(s.wsURL, user, sink, cfHandle)
	if err != nil {
		return nil, err
	}
	if _, err := s.command(c, `"connect":{"token":"`+token(s.secret, user)+`","name":"bench-peers"}`, 10*time.Second); err != nil {
		c.Close()
		return nil, fmt.Errorf("connect: %w", err)
	}
	return c, nil
}

func (s *Centrifugo) Open(user string, sink Sink) (*Client, error) {
	c, err := s.connect(user, sink)
	if err != nil {
		return nil, err
	}
	c.Channel = "u-" + user
	r, err := s.command(c, `"subscribe":{"channel":"`+c.Channel+`"}`, 10*time.Second)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("subscribe: %w", err)
	}
	c.Epoch = jsonString(r, "epoch")
	if o := jsonInt(r, "offset"); o > 0 {
		c.Offset = uint64(o)
	}
	return c, nil
}

func (s *Centrifugo) Join(c *Client, name string, _ *HTTPConn) error {
	_, err := s.command(c, `"subscribe":{"channel":"`+s.Shared(name)+`"}`, 10*time.Second)
	return err
}

func (s *Centrifugo) Own(c *Client) string      { return c.Channel }
func (s *Centrifugo) Shared(name string) string { return name }

func (s *Centrifugo) Publish(api *HTTPConn, msgs []Msg) error {
	var b []byte
	path := "/api/publish"
	if len(msgs) > 1 {
		path = "/api/batch"
		b = append(b, `{"commands":[`...)
	}
	for i, m := range msgs {
		if i > 0 {
			b = append(b, ',')
		}
		if len(msgs) > 1 {
			b = append(b, `{"publish":`...)
		}
		b = append(b, `{"channel":"`...)
		b = append(b, m.Dest...)
		b = append(b, `","data":`...)
		b = append(b, m.Payload...)
		b = append(b, '}')
		if len(msgs) > 1 {
			b = append(b, '}')
		}
	}
	if len(msgs) > 1 {
		b = append(b, `]}`...)
	}
	status, resp, err := api.Do("POST", path, b)
	if err != nil {
		return err
	}
	// Centrifugo answers 200 with {"error":…} (or a reply's error in a batch) when it refuses.
	if status != 200 || bytes.Contains(resp, []byte(`"error"`)) {
		return errStatus(status, resp)
	}
	if len(msgs) > 1 {
		if n := bytes.Count(resp, []byte(`{"publish":`)); n != len(msgs) {
			return fmt.Errorf("batch: %d publish replies for %d commands", n, len(msgs))
		}
	}
	return nil
}

func (s *Centrifugo) Resume(c *Client, sink Sink) (*Client, bool, error) {
	n, err := s.connect(c.User, sink)
	if err != nil {
		return nil, false, err
	}
	n.Channel = c.Channel
	sub, _ := json.Marshal(map[string]any{"channel": c.Channel, "recover": true, "epoch": c.Epoch, "offset": c.Offset})
	r, err := s.command(n, `"subscribe":`+string(sub), 5*time.Minute)
	if err != nil {
		n.Close()
		return nil, false, fmt.Errorf("subscribe: %w", err)
	}
	// The reply carries the missed publications; publications after it arrive as pushes.
	scanDeliveries(r, sink)
	return n, bytes.Contains(r, []byte(`"recovered":true`)), nil
}
