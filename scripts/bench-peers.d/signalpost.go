// signalpost as a Target: Socket.IO v4 / Engine.IO 4 frames over a WebSocket (`0{open}`,
// `40{auth}`, `42[event,data]`, ping `2` → pong `3`) and the HTTP server API (/server/enqueue,
// its batch form, /server/connect). See docs/protocol.md.

package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Signalpost drives a signalpost node.
type Signalpost struct {
	base, apiKey, secret string
	wsURL                string
}

// NewSignalpost returns the Target for the node at base (http://host:port).
func NewSignalpost(base, apiKey, secret string) *Signalpost {
	return &Signalpost{
		base: base, apiKey: apiKey, secret: secret,
		wsURL: "ws://" + strings.TrimPrefix(base, "http://") + "/socket.io/?EIO=4&transport=websocket",
	}
}

func (s *Signalpost) API() *HTTPConn {
	h := ""
	if s.apiKey != "" {
		h = "Authorization: Bearer " + s.apiKey
	}
	return NewHTTPConn(s.base, h)
}

var (
	sioSignal = []byte(`42["signal",`)
	sioPing   = []byte("2")
	sioPong   = []byte("3")
)

func sioHandle(c *Client, f []byte) {
	switch {
	case bytes.HasPrefix(f, sioSignal):
		scanDeliveries(f, c.sink)
	case bytes.Equal(f, sioPing):
		c.send(sioPong)
	default:
		c.control(f)
	}
}

// sioEvent splits a `42["name",data]` frame; ok is false for other frames.
func sioEvent(f []byte) (name string, data json.RawMessage, ok bool) {
	if !bytes.HasPrefix(f, []byte("42[")) {
		return "", nil, false
	}
	var v []json.RawMessage
	if json.Unmarshal(f[2:], &v) != nil || len(v) == 0 {
		return "", nil, false
	}
	if json.Unmarshal(v[0], &name) != nil {
		return "", nil, false
	}
	if len(v) > 1 {
		data = v[1]
	}
	return name, data, true
}

func isEvent(name string) func([]byte) bool {
	prefix := []byte(`42["` + name + `"`)
	return func(f []byte) bool { return bytes.HasPrefix(f, prefix) || bytes.HasPrefix(f, []byte("44")) }
}

// connect opens a socket with auth and waits for `session` and `synced`.
func (s *Signalpost) connect(user string, auth map[string]any, sink Sink, timeout time.Duration) (*Client, error) {
	c, err := dial(s.wsURL, user, sink, sioHandle)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*Client, error) {
		c.Close()
		return nil, err
	}
	if _, err := c.next(10*time.Second, func(f []byte) bool { return len(f) > 0 && f[0] == '0' }); err != nil {
		return fail(fmt.Errorf("engine.io open: %w", err))
	}
	a, _ := json.Marshal(auth)
	if err := c.send(append([]byte("40"), a...)); err != nil {
		return fail(err)
	}
	f, err := c.next(10*time.Second, isEvent("session"))
	if err != nil {
		return fail(fmt.Errorf("session: %w", err))
	}
	if bytes.HasPrefix(f, []byte("44")) {
		return fail(fmt.Errorf("refused: %s", f[2:]))
	}
	_, data, _ := sioEvent(f)
	var sess struct {
		ClientID    string `json:"clientId"`
		ResumeToken string `json:"resumeToken"`
	}
	json.Unmarshal(data, &sess)
	c.ID, c.ResumeToken = sess.ClientID, sess.ResumeToken
	f, err = c.next(timeout, isEvent("synced"))
	if err != nil {
		return fail(fmt.Errorf("synced: %w", err))
	}
	_, data, _ = sioEvent(f)
	var synced struct {
		Cursors map[string]int64 `json:"cursors"`
	}
	json.Unmarshal(data, &synced)
	c.Cursor = synced.Cursors["client:"+c.ID]
	return c, nil
}

func (s *Signalpost) Open(user string, sink Sink) (*Client, error) {
	return s.connect(user, map[string]any{"token": token(s.secret, user)}, sink, 20*time.Second)
}

func (s *Signalpost) Join(c *Client, name string, api *HTTPConn) error {
	body, _ := json.Marshal(map[string]any{"client": c.ID, "addresses": []string{s.Shared(name)}})
	status, resp, err := api.Do("POST", "/server/connect", body)
	if err != nil {
		return err
	}
	if status != 200 {
		return errStatus(status, resp)
	}
	_, err = c.next(10*time.Second, isEvent("bound"))
	return err
}

func (s *Signalpost) Own(c *Client) string      { return "client:" + c.ID }
func (s *Signalpost) Shared(name string) string { return "channel:" + name }

func (s *Signalpost) Publish(api *HTTPConn, msgs []Msg) error {
	var b []byte
	if len(msgs) > 1 {
		b = append(b, '[')
	}
	for i, m := range msgs {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"address":"`...)
		b = append(b, m.Dest...)
		b = append(b, `","payload":`...)
		b = append(b, m.Payload...)
		b = append(b, '}')
	}
	if len(msgs) > 1 {
		b = append(b, ']')
	}
	status, resp, err := api.Do("POST", "/server/enqueue", b)
	if err != nil {
		return err
	}
	if status != 202 && status != 200 {
		return errStatus(status, resp)
	}
	if bytes.Contains(resp, []byte(`"error"`)) {
		return errStatus(status, resp)
	}
	return nil
}

func (s *Signalpost) Resume(c *Client, sink Sink) (*Client, bool, error) {
	auth := map[string]any{
		"token":       token(s.secret, c.User),
		"clientId":    c.ID,
		"resumeToken": c.ResumeToken,
		"cursors":     map[string]int64{"client:" + c.ID: c.Cursor},
	}
	n, err := s.connect(c.User, auth, sink, 5*time.Minute)
	if err != nil {
		return nil, false, err
	}
	return n, true, nil
}

// user names are unique per run so that a rerun never meets an earlier identity.
func userName(tag string, i int) string { return "u" + tag + "-" + strconv.Itoa(i) }
