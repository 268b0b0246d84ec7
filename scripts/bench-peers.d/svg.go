// The chart of docs/bench-peers.svg: one horizontal bar per table row, on a log scale centred
// on 1 — how many times better (right, green) or worse (left, red) signalpost did than
// Centrifugo, whichever way the metric counts — labelled with the table's ratio.

package main

import (
	"fmt"
	"html"
	"math"
	"strings"
)

func chart(title string, bars []bar) string {
	const (
		width  = 860
		labelW = 280
		left   = labelW + 10
		right  = width - 20
		top    = 70
		rowH   = 30
	)
	// The scale covers 1/10 … 10 at least, widened to powers of ten that hold every bar, up to
	// 1/100 … 100; a bar past that is cut at the edge (its label keeps the real ratio).
	lo, hi := -1.0, 1.0
	for _, b := range bars {
		l := math.Log10(math.Max(b.adv, 1e-4))
		lo = math.Max(-2, math.Min(lo, math.Floor(l)))
		hi = math.Min(2, math.Max(hi, math.Ceil(l)))
	}
	x := func(adv float64) float64 {
		l := math.Min(hi, math.Max(lo, math.Log10(math.Max(adv, 1e-4))))
		return left + (l-lo)/(hi-lo)*(right-left)
	}
	height := top + rowH*len(bars) + 50
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="15" font-weight="bold">%s</text>`+"\n", 10, html.EscapeString(title))
	fmt.Fprintf(&b, `<text x="%d" y="42" fill="#555">times better (→, green) or worse (←, red) than Centrifugo, log scale; labels: signalpost / Centrifugo as in the table</text>`+"\n", 10)
	// grid: 1-2-5 steps
	for e := lo; e <= hi; e++ {
		for _, m := range []float64{1, 2, 5} {
			v := m * math.Pow(10, e)
			if math.Log10(v) > hi+1e-9 {
				continue
			}
			gx := x(v)
			stroke, w := "#ddd", 1.0
			if v == 1 {
				stroke, w = "#333", 1.5
			}
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="%.1f"/>`+"\n", gx, top-8, gx, top+rowH*len(bars), stroke, w)
			if m != 1 {
				continue // labels on powers of ten only
			}
			label := fmt.Sprintf("%g×", v)
			if v < 1 {
				label = fmt.Sprintf("1/%g", 1/v)
			}
			fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#555">%s</text>`+"\n", gx, top+rowH*len(bars)+16, label)
		}
	}
	fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="end" fill="#c62828">← signalpost worse</text>`+"\n", x(1)-6, top+rowH*len(bars)+36)
	fmt.Fprintf(&b, `<text x="%.1f" y="%d" fill="#2e7d32">signalpost better →</text>`+"\n", x(1)+6, top+rowH*len(bars)+36)
	for i, br := range bars {
		y := top + i*rowH
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", labelW, y+rowH/2+4, html.EscapeString(br.label))
		x0, x1 := x(1), x(br.adv)
		color := "#2e7d32"
		if br.adv < 1 {
			color = "#c62828"
			x0, x1 = x1, x0
		}
		fmt.Fprintf(&b, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s" opacity="0.85"/>`+"\n", x0, y+5, math.Max(x1-x0, 1), rowH-10, color)
		tx, anchor, fill := x(br.adv)+5, "start", "black"
		if br.adv < 1 {
			tx, anchor = x(br.adv)-5, "end"
		}
		// a label that would leave the picture goes inside the bar's end
		textW := 6.5 * float64(len(br.text))
		if anchor == "start" && tx+textW > width {
			tx, anchor, fill = x(br.adv)-5, "end", "white"
		} else if anchor == "end" && tx-textW < labelW+10 {
			tx, anchor, fill = x(br.adv)+5, "start", "white"
		}
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="%s" font-size="11" fill="%s">%s</text>`+"\n", tx, y+rowH/2+4, anchor, fill, html.EscapeString(br.text))
	}
	b.WriteString("</svg>\n")
	return b.String()
}
